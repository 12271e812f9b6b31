//! Creating a `run: job` migration's Job when the API server's answer is
//! lost, against the real kube-apiserver (envtest). The client backstop
//! uses goes through a layer that fails the Job's create the way a dropped
//! connection does, while the request itself reaches the server later (or
//! never): backstop must end knowing whether a Job runs, and must never
//! say "nothing runs" while a create may still land.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backstop::manifests::{Carrier, Snapshot};
use backstop::runner::{MigrateOutcome, RunIdentity, Runner, SqlRunner};
use common::envtest::{ControlPlane, ADMIN_TOKEN};
use common::*;
use http_body_util::BodyExt;
use hyper::http::{Method, Request, Response};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::client::{Body, DynBody};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const RUN: &str = "20261207-000000000-abc1234";

/// What the layer does to the creates of Jobs.
#[derive(Clone, Copy)]
enum Lose {
    /// The first create is stored, and its answer replaced by a dropped
    /// connection.
    FirstAnswer,
    /// The first create fails at once and reaches the server 3 s later
    /// (as a request that was sent before the connection dropped).
    FirstLandsLate,
    /// Every create fails and none reaches the server.
    Every,
}

struct Plan {
    lose: Lose,
    creates: AtomicUsize,
    /// The server's answer to the create that landed late.
    late: Mutex<Option<Result<(), u16>>>,
    plane: kube::Client,
}

struct Intercept<S> {
    inner: S,
    plan: Arc<Plan>,
}

/// The layer: every request through [`Intercept`].
struct Losing(Arc<Plan>);

impl<S> tower::Layer<S> for Losing {
    type Service = Intercept<S>;
    fn layer(&self, inner: S) -> Intercept<S> {
        Intercept {
            inner,
            plan: self.0.clone(),
        }
    }
}

impl<S> tower::Service<Request<Body>> for Intercept<S>
where
    S: tower::Service<Request<Body>, Response = Response<Box<DynBody>>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let create = req.method() == Method::POST && req.uri().path().ends_with("/jobs");
        if !create {
            return Box::pin(self.inner.call(req));
        }
        let n = self.plan.creates.fetch_add(1, Ordering::SeqCst);
        let lost = || -> BoxError {
            Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ))
        };
        match self.plan.lose {
            Lose::FirstAnswer if n == 0 => {
                let stored = self.inner.call(req);
                Box::pin(async move {
                    stored.await?;
                    Err(lost())
                })
            }
            Lose::FirstLandsLate if n == 0 => {
                let plan = self.plan.clone();
                Box::pin(async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let job: Job = serde_json::from_slice(&body)?;
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        let jobs: Api<Job> = Api::namespaced(plan.plane.clone(), "default");
                        let answer = match jobs.create(&PostParams::default(), &job).await {
                            Ok(_) => Ok(()),
                            Err(kube::Error::Api(e)) => Err(e.code),
                            Err(e) => panic!("the late create did not reach the server: {e}"),
                        };
                        *plan.late.lock().unwrap() = Some(answer);
                    });
                    Err(lost())
                })
            }
            Lose::FirstAnswer | Lose::FirstLandsLate => Box::pin(self.inner.call(req)),
            Lose::Every => Box::pin(async move { Err(lost()) }),
        }
    }
}

/// A Job carrier with a 3 s timeout, parsed as backstop parses it.
fn carrier() -> Carrier {
    let yaml = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: shop-late\n  namespace: default\n  annotations:\n    backstop.dev/migration: 0001-late\n    backstop.dev/database: cnpg:app-db\n    backstop.dev/run: job\n    backstop.dev/timeout: 3s\n    kustomize.toolkit.fluxcd.io/reconcile: disabled\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - name: migrate\n          image: registry.example.com/shop-migrate:1.0\n";
    let file = "apps/shop/migrations/0001-late.yaml".to_string();
    let mut snapshot = Snapshot::new();
    snapshot.insert(file.clone(), yaml.as_bytes().to_vec());
    backstop::manifests::parse_file(&snapshot, &file, yaml.as_bytes())
        .unwrap()
        .pop()
        .unwrap()
}

struct Setup {
    plane: ControlPlane,
    f: Fixture,
}

async fn setup() -> Option<Setup> {
    let plane = ControlPlane::start(&[]).await?;
    let f = Fixture::new().await;
    Some(Setup { plane, f })
}

impl Setup {
    fn plan(&self, lose: Lose) -> Arc<Plan> {
        Arc::new(Plan {
            lose,
            creates: AtomicUsize::new(0),
            late: Mutex::new(None),
            plane: self.plane.client.clone(),
        })
    }

    /// A runner whose client goes through `plan`'s layer.
    async fn runner(&self, plan: &Arc<Plan>) -> backstop::k8s::job::KubeRunner {
        let kc: kube::config::Kubeconfig =
            serde_yaml::from_str(&common::envtest::kubeconfig(self.plane.port, ADMIN_TOKEN)).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
        let client = kube::client::ClientBuilder::try_from(config)
            .unwrap()
            .with_layer(&Losing(plan.clone()))
            .build();
        backstop::k8s::job::KubeRunner { client, sql: SqlRunner }
    }

    fn db(&self) -> Database {
        self.f.database()
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.plane.client.clone(), "default")
    }

    /// Plays the Job controller: the first Job that is not a name's hold
    /// completes.
    async fn complete_the_job(&self) -> String {
        let name = loop {
            let list = self.jobs().list(&Default::default()).await.unwrap();
            if let Some(j) = list.items.into_iter().find(|j| !held(j)) {
                break j.metadata.name.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let now = "2026-01-01T00:00:00Z";
        let status = json!({"status": {"conditions": [{"type": "Complete", "status": "True", "reason": "Completed",
            "lastProbeTime": now, "lastTransitionTime": now}], "startTime": now}});
        self.jobs()
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        name
    }
}

use backstop::db::Database;

/// Whether `job` only holds its name (runs no pod).
fn held(job: &Job) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("backstop.dev/holds-name"))
}

async fn migrate(runner: &backstop::k8s::job::KubeRunner, db: &Database, resumed: bool) -> MigrateOutcome {
    let who = RunIdentity {
        run_id: RUN,
        commit: "abc1234abc1234abc1234abc1234abc1234abc12",
        resumed,
    };
    runner.migrate(db, &carrier(), who).await.unwrap()
}

#[tokio::test]
async fn a_create_stored_with_its_answer_lost_is_found_by_holding_the_name_and_watched_to_its_end() {
    let Some(s) = setup().await else { return };
    let plan = s.plan(Lose::FirstAnswer);
    let runner = s.runner(&plan).await;
    let db = s.db();
    let (outcome, name) = tokio::join!(migrate(&runner, &db, false), s.complete_the_job());
    assert_eq!(outcome.error, None, "{outcome:?}");
    assert!(outcome.committed && outcome.still_running.is_none(), "{outcome:?}");
    assert_eq!(plan.creates.load(Ordering::SeqCst), 2, "the Job, then the name's hold");
    let jobs = s.jobs().list(&Default::default()).await.unwrap().items;
    assert_eq!(jobs.len(), 1, "one Job");
    assert!(!held(&jobs[0]), "the Job itself, not a hold: {jobs:?}");
    assert_eq!(jobs[0].metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(
        s.f.count("SELECT count(*) FROM backstop.migration_history WHERE id = '0001-late' AND success")
            .await,
        1
    );
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_never_sent_again_and_one_landing_late_starts_nothing() {
    let Some(s) = setup().await else { return };
    let plan = s.plan(Lose::FirstLandsLate);
    let runner = s.runner(&plan).await;
    let outcome = migrate(&runner, &s.db(), false).await;
    // The name is held before the lost create lands: nothing ran, nothing
    // will, and the run counts it as failed (it restores, safely).
    let error = outcome.error.clone().unwrap_or_default();
    assert!(error.contains("held by a Job that runs no pod"), "{outcome:?}");
    assert!(outcome.committed && outcome.still_running.is_none(), "{outcome:?}");
    let late = loop {
        if let Some(late) = *plan.late.lock().unwrap() {
            break late;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(late, Err(409), "the late create met the hold");
    let jobs = s.jobs().list(&Default::default()).await.unwrap().items;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(held(&jobs[0]), "only the hold: {jobs:?}");
    assert_eq!(jobs[0].spec.clone().unwrap().parallelism, Some(0));
    assert_eq!(
        s.f.count("SELECT count(*) FROM pg_class WHERE relname = 'migration_history'")
            .await,
        0,
        "nothing ran, nothing was recorded"
    );
}

#[tokio::test]
async fn a_create_that_is_never_answered_is_never_called_not_started_and_holds_for_a_person() {
    let Some(s) = setup().await else { return };
    let plan = s.plan(Lose::Every);
    let runner = s.runner(&plan).await;
    let outcome = migrate(&runner, &s.db(), false).await;
    // Whether a Job was stored cannot be told: the run must not restore
    // under one that may yet run.
    let still = outcome.still_running.clone().unwrap_or_default();
    assert!(still.contains("cannot be told"), "{outcome:?}");
    assert!(outcome.committed, "{outcome:?}");
    assert!(
        plan.creates.load(Ordering::SeqCst) >= 2,
        "the create was sent again until the timeout"
    );
}

#[tokio::test]
async fn a_resumed_attempt_whose_job_is_not_there_holds_its_name_so_a_late_create_starts_nothing() {
    let Some(s) = setup().await else { return };
    let runner = backstop::k8s::job::KubeRunner {
        client: s.plane.client.clone(),
        sql: SqlRunner,
    };
    let outcome = migrate(&runner, &s.db(), true).await;
    let error = outcome.error.clone().unwrap_or_default();
    assert!(
        error.contains("of the interrupted attempt is gone; its name is now held by a Job that runs no pod"),
        "{outcome:?}"
    );
    assert!(outcome.committed && outcome.still_running.is_none(), "{outcome:?}");
    let jobs = s.jobs().list(&Default::default()).await.unwrap().items;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let hold = &jobs[0];
    assert!(held(hold), "{hold:?}");
    let spec = hold.spec.clone().unwrap();
    assert_eq!(spec.parallelism, Some(0), "it runs no pod");
    assert_eq!(
        spec.active_deadline_seconds, None,
        "it never ends, so no TTL frees the name"
    );
    assert_eq!(
        hold.metadata.annotations.clone().unwrap()["backstop.dev/holds-name"],
        RUN
    );
    // The killed attempt's create, landing now, starts nothing.
    let late = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": hold.metadata.name.clone().unwrap(), "namespace": "default"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "migrate", "image": "registry.example.com/shop-migrate:1.0"}]}}}});
    let late: Job = serde_json::from_value(late).unwrap();
    match s.jobs().create(&PostParams::default(), &late).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409),
        other => panic!("the late create was stored: {other:?}"),
    }
}
