//! `backstop controller`: a `kube::runtime::Controller` over every
//! Kustomization annotated `backstop.dev/guard: enabled`. For each, the
//! GitRepository it follows gives the repository URL and the gate branch
//! (`spec.ref.branch`), the annotation `backstop.dev/upstream-branch` the
//! upstream (default `main`), `spec.path` the guarded folder, and the
//! GitRepository's `spec.secretRef` (keys `username`, `password`) the git
//! credentials, unless the Kustomization's `backstop.dev/git-secret` names
//! another Secret (Flux only reads; backstop pushes the gate and reverts).
//!
//! - **Reconcile**: one pass of the Kustomization's engine (the same gate,
//!   failure taxonomy and ownership rules as local mode). Every step of a run
//!   is written to its `MigrationRun` before the next starts, so a reconcile
//!   cut short resumes at the step it was in. Kustomizations reconcile
//!   concurrently (a long migration on one app does not hold up another);
//!   runs on one database are serialized by the database claim. A new
//!   GitRepository artifact, a change of the Kustomization, or a person's
//!   annotation on a `MigrationRun` triggers a reconcile; otherwise every
//!   `interval`. A failed pass (an API or git fault) is retried with backoff
//!   and never reverts anything.
//! - **Leadership**: the controller runs only while this replica holds the
//!   Lease, and is dropped (every reconcile cancelled) the moment a renewal
//!   fails; every `MigrationRun` write carries the leadership's fence and is
//!   refused once the Lease moved on. `/readyz` answers for a healthy
//!   process, leader or not.
//! - **What the gate waits for** is published once per change: a Warning
//!   Event on the Kustomization, a `MigrationRun` for each refused commit
//!   (`kubectl get mrun`), and the `backstop_refusals_total` metric.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::Resource;
use tracing::Instrument;

use super::crd::{MigrationRun, MigrationRunSpec};
use super::engines::Engines;
use super::ops::{serve, LeaderElection, Metrics};
use super::pause::SUSPENDED_BY;
use super::store::KUSTOMIZATION_LABEL;
use crate::gate::Wait;
use crate::run::{Outcome, RunRecord};

/// Annotation that puts a Kustomization under guard.
pub const GUARD: &str = "backstop.dev/guard";
/// Annotation naming the upstream branch.
pub const UPSTREAM: &str = "backstop.dev/upstream-branch";
/// Annotation naming the Secret (`username`, `password`) backstop pushes with,
/// when it differs from the GitRepository's read credentials.
pub const GIT_SECRET: &str = "backstop.dev/git-secret";
/// Annotation naming the repository on the forge (`owner/name`, or the GitLab
/// project path); default: the path of the GitRepository URL.
pub const FORGE_REPO: &str = "backstop.dev/forge-repo";

/// Failures that stop the controller (a single Kustomization's failure does not).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Client(#[from] super::ClientError),
    #[error("PostgreSQL client programs are needed for dump checkpoints")]
    Bin(#[from] crate::pgbin::PgBinError),
    #[error(transparent)]
    Ops(#[from] super::ops::OpsError),
    #[error("forge configuration: {0}")]
    Forge(String),
}

/// Why one reconcile of a Kustomization did not complete (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot guard {key}: {message}")]
    Setup { key: String, message: String },
    #[error("pass of {key} failed")]
    Pass {
        key: String,
        source: crate::run::EngineError,
    },
}

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub kubeconfig: Option<PathBuf>,
    /// Where git mirrors, checkpoints and reports live.
    pub state: PathBuf,
    pub interval: Duration,
    /// Bound on the pause handshake and the post-promotion health gate.
    pub timeout: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub metrics_addr: String,
    /// Namespace and name of the leader-election Lease.
    pub lease: (String, String),
    /// How long the Lease is valid without renewal (renewed every third of
    /// it; leadership ends at the first failed renewal).
    pub lease_duration: Duration,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Checkpoints of the newest this many ended runs are kept (0: all).
    pub keep_checkpoints: usize,
    /// When a CNPG checkpoint creates a Backup.
    pub base_policy: crate::checkpoint::base::BasePolicy,
    /// `--state` is on a volume that outlives the pod and is shared by the
    /// replicas: only then are `dump` checkpoints taken.
    pub durable_state: bool,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Where revert pull requests are opened (None: revert branches only).
    pub forge: Option<ControllerForge>,
}

/// The forge of the controller; its token is in a Secret.
#[derive(Debug, Clone)]
pub struct ControllerForge {
    pub kind: crate::forge::ForgeKind,
    pub url: Option<String>,
    /// `NAMESPACE/NAME` of the Secret whose `token` key holds the forge token.
    pub token_secret: String,
    pub retry: crate::forge::Retry,
}

/// `NS/NAME` of an object.
fn key_of(obj: &DynamicObject) -> String {
    format!(
        "{}/{}",
        obj.metadata.namespace.as_deref().unwrap_or_default(),
        obj.metadata.name.as_deref().unwrap_or_default()
    )
}

pub(crate) fn annotation<'a>(obj: &'a DynamicObject, key: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What reconciles share.
struct Ctx {
    engines: Engines,
    /// Every Kustomization, as the controller's watch sees them.
    kustomizations: kube::runtime::reflector::Store<DynamicObject>,
    /// Every GitRepository (which Kustomizations share a gate branch).
    repositories: kube::runtime::reflector::Store<DynamicObject>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    interval: Duration,
    /// Per Kustomization: the last wait published (no repeats) and the
    /// consecutive failed reconciles (backoff).
    published: tokio::sync::Mutex<HashMap<String, String>>,
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// Per Kustomization (`namespace/name`): its MigrationRuns that need a
    /// full pass (open, a pending pull request, a hold, awaiting a person),
    /// kept by the MigrationRun watch.
    attention: Attention,
    /// Per Kustomization: when its last full pass ended, forgotten on any
    /// change of one of its MigrationRuns (see `may_skip`).
    last_full: Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>>,
}

type Attention = Arc<std::sync::Mutex<HashMap<String, std::collections::BTreeSet<String>>>>;

/// Whether `mr` needs full passes of its Kustomization. A record that does
/// not parse counts as needing them.
fn needs_attention(mr: &MigrationRun) -> bool {
    match super::store::record_of(mr) {
        None => false,
        Some(Ok(run)) => crate::run::changes_in_pass(&run) || run.awaits_person(),
        Some(Err(_)) => true,
    }
}

/// Runs until interrupted: follows while another replica leads, leads while
/// this one holds the Lease.
pub async fn run(opts: ControllerOptions) -> Result<(), ControllerError> {
    let client = super::client(opts.kubeconfig.as_deref()).await?;
    let bindir = crate::pgbin::bindir()?;
    let metrics = Arc::new(Metrics::default());
    serve(&opts.metrics_addr, metrics.clone()).await?;
    // The forge token, read once; never logged.
    let forge_token = match &opts.forge {
        Some(f) => Some(
            super::engines::secret_value(&client, &f.token_secret, "token")
                .await
                .map_err(ControllerError::Forge)?,
        ),
        None => None,
    };
    metrics.set_ready(true);
    let election = LeaderElection {
        api: Api::namespaced(client.clone(), &opts.lease.0),
        namespace: opts.lease.0.clone(),
        name: opts.lease.1.clone(),
        identity: opts.identity.clone(),
        duration: opts.lease_duration,
    };
    tracing::info!(state = %opts.state.display(), identity = %opts.identity, "controller started");
    loop {
        let transitions = loop {
            match election.try_acquire().await {
                Ok(Some(t)) => break t,
                Ok(None) => tracing::debug!(lease = %election.name, "another replica leads; waiting"),
                Err(e) => tracing::warn!(error = %crate::run::chain(&e), "cannot read the leader Lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        };
        metrics.set_leader(true);
        tracing::info!(identity = %opts.identity, transitions, "leading");
        let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
        let renewing = election.clone();
        // Leadership ends at a deadline two thirds into the Lease from the
        // start of the last successful renewal, well before a follower may
        // take it over (at the full duration, by its own reading).
        let renewal = tokio::spawn(async move {
            let d = renewing.duration;
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(d / 3).await;
                let started = tokio::time::Instant::now();
                let deadline = last_ok + d * 2 / 3;
                let renewed = tokio::time::timeout_at(deadline, renewing.try_acquire()).await;
                if matches!(renewed, Ok(Ok(Some(t))) if t == transitions) {
                    last_ok = started;
                } else {
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        });
        let ks_res = kustomization_resource();
        let main = Controller::new_with(
            Api::<DynamicObject>::all_with(client.clone(), &ks_res),
            watcher::Config::default(),
            ks_res,
        )
        // Bounded: a thousand Kustomizations woken by one GitRepository
        // would otherwise open a thousand git tasks and database connections.
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency));
        let repo_res = git_repository_resource();
        let writer = kube::runtime::reflector::store::Writer::new(repo_res.clone());
        let repositories = writer.as_reader();
        let repo_watch = tokio::spawn(
            kube::runtime::reflector(
                writer,
                watcher(
                    Api::<DynamicObject>::all_with(client.clone(), &repo_res),
                    watcher::Config::default(),
                ),
            )
            .for_each(|_| futures::future::ready(())),
        );
        // Wait here, once, until the GitRepository watch has listed
        // everything: kube-runtime's `Store::wait_until_ready` wakes only
        // the last of several concurrent waiters (its DelayedInit polls one
        // oneshot receiver from many tasks), so reconciles waiting for it
        // at startup could stay parked forever, and with them their
        // Kustomizations (a reconcile never starts while one is in flight).
        tokio::select! {
            ready = repositories.wait_until_ready() => {
                if ready.is_err() {
                    tracing::warn!("the GitRepository watch stopped before it listed; retrying");
                }
            }
            _ = lost.changed() => {
                tracing::warn!(identity = %opts.identity, "lost the leader Lease before the watches listed");
                renewal.abort();
                repo_watch.abort();
                metrics.set_leader(false);
                continue;
            }
        }
        let ctx = Arc::new(Ctx {
            repositories,
            kustomizations: main.store(),
            engines: Engines::new(
                client.clone(),
                opts.clone(),
                bindir.clone(),
                forge_token.clone(),
                Some(election.fence(transitions)),
            ),
            metrics: metrics.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "backstop".into(),
                    instance: Some(opts.identity.clone()),
                },
            ),
            interval: opts.interval,
            published: Default::default(),
            failures: Default::default(),
            attention: Default::default(),
            last_full: Default::default(),
        });
        let controller = controller(main, client.clone(), ctx);
        tokio::select! {
            _ = controller => tracing::warn!("the controller's watches ended"),
            _ = lost.changed() => tracing::warn!(identity = %opts.identity, "lost the leader Lease; every reconcile stopped"),
            _ = tokio::signal::ctrl_c() => {
                renewal.abort();
                repo_watch.abort();
                return Ok(());
            }
        }
        renewal.abort();
        repo_watch.abort();
        metrics.set_leader(false);
    }
}

/// The reconciler over guarded Kustomizations, triggered by their
/// GitRepositories and MigrationRuns too.
fn controller(
    main: Controller<DynamicObject>,
    client: kube::Client,
    ctx: Arc<Ctx>,
) -> impl std::future::Future<Output = ()> {
    let ks_res = kustomization_resource();
    let repo_res = git_repository_resource();
    let store = main.store();
    let by_source = ks_res.clone();
    let by_run = ks_res.clone();
    let attention = ctx.attention.clone();
    let last_full = ctx.last_full.clone();
    main.watches_with(
        Api::<DynamicObject>::all_with(client.clone(), &repo_res),
        repo_res,
        watcher::Config::default(),
        move |repo: DynamicObject| {
            let (ns, name) = (repo.metadata.namespace.clone(), repo.metadata.name.clone());
            store
                .state()
                .into_iter()
                .filter(|ks| {
                    let source = &ks.data["spec"]["sourceRef"];
                    source["kind"] == "GitRepository"
                        && source["name"].as_str() == name.as_deref()
                        && source["namespace"].as_str().or(ks.metadata.namespace.as_deref()) == ns.as_deref()
                })
                .map(|ks| ObjectRef::from_obj_with(ks.as_ref(), by_source.clone()))
                .collect::<Vec<_>>()
        },
    )
    .watches(
        Api::<MigrationRun>::all(client),
        watcher::Config::default(),
        move |mr: MigrationRun| {
            let ks = mr
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(KUSTOMIZATION_LABEL))
                .cloned();
            let ns = mr.metadata.namespace.clone().unwrap_or_default();
            // Marked before the reconcile this triggers can read it. (A
            // deleted run stays marked: only extra full passes.)
            if let (Some(name), Ok(mut last)) = (&ks, last_full.lock()) {
                last.remove(&format!("{ns}/{name}"));
            }
            if let (Some(name), Some(run), Ok(mut attention)) = (&ks, &mr.metadata.name, attention.lock()) {
                let runs = attention.entry(format!("{ns}/{name}")).or_default();
                if needs_attention(&mr) {
                    runs.insert(run.clone());
                } else {
                    runs.remove(run);
                }
            }
            ks.map(|name: String| ObjectRef::new_with(name.as_str(), by_run.clone()).within(&ns))
        },
    )
    .run(reconcile, error_policy, ctx)
    .for_each(|result| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "controller event");
        }
        futures::future::ready(())
    })
}

async fn reconcile(ks: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let key = key_of(&ks);
    let span = tracing::info_span!("kustomization", kustomization = %key);
    async move {
        if annotation(&ks, GUARD) != Some("enabled") {
            return Ok(Action::await_change());
        }
        if suspended_by_person(&ks) {
            tracing::info!("suspended by a person; waiting");
            return Ok(Action::requeue(ctx.interval));
        }
        tracing::debug!("reconcile started");
        // Which Kustomizations share a gate is read from the GitRepository
        // watch: wait until it has listed them all once.
        if ctx.repositories.wait_until_ready().await.is_err() {
            return Err(ReconcileError::Setup {
                key,
                message: "the GitRepository watch stopped".into(),
            });
        }
        let others = ctx.kustomizations.state();
        let repos = ctx.repositories.state();
        tracing::debug!(
            repositories = repos.len(),
            kustomizations = others.len(),
            "watches ready"
        );
        let engine = match ctx.engines.get(&ks, &others, &repos).await {
            Ok(engine) => engine,
            Err(message) => {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "CannotGuard".into(),
                    note: Some(truncate(message.clone())),
                    action: "Guard".into(),
                    secondary: None,
                };
                ctx.publish_once(&ks, &format!("setup: {message}"), &event).await;
                return Err(ReconcileError::Setup { key, message });
            }
        };
        // Of the Kustomizations a push woke, those it does not concern
        // return here, without a single API call.
        if ctx.may_skip(&key)
            && engine
                .nothing_pending_here()
                .await
                .map_err(|source| ReconcileError::Pass {
                    key: key.clone(),
                    source,
                })?
        {
            tracing::debug!("nothing pending under this path; skipped");
            ctx.metrics.reconciled(&key);
            return Ok(Action::requeue(ctx.interval));
        }
        let report = engine.pass().await.map_err(|source| ReconcileError::Pass {
            key: key.clone(),
            source,
        })?;
        if let Ok(mut last) = ctx.last_full.lock() {
            last.insert(key.clone(), std::time::Instant::now());
        }
        if let Ok(mut failures) = ctx.failures.lock() {
            failures.remove(&key);
        }
        ctx.metrics.reconciled(&key);
        if !report.runs.is_empty() {
            let runs = engine.store.list().await.unwrap_or_default();
            for (id, outcome, location) in &report.runs {
                tracing::info!(run = %id, ?outcome, report = %location, "run finished");
                let record = runs.iter().find(|r| &r.id == id);
                ctx.metrics.record_run(*outcome, record);
                publish_events(&ctx.recorder, &ctx.engines.client, &ks, id, *outcome, record).await;
            }
        }
        ctx.publish_wait(&ks, report.waiting.as_ref()).await;
        let next = match &report.waiting {
            Some(Wait::Retrying { next_at, .. }) => (*next_at - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
                .clamp(Duration::from_secs(1), ctx.interval),
            _ => ctx.interval,
        };
        Ok(Action::requeue(next))
    }
    .instrument(span)
    .await
}

/// Suspended by a person (not by backstop's own pause): not reconciled.
pub(super) fn suspended_by_person(ks: &DynamicObject) -> bool {
    ks.data["spec"]["suspend"].as_bool().unwrap_or(false) && annotation(ks, SUSPENDED_BY).is_none()
}

/// A failed reconcile is logged once and retried with backoff (1 s doubling
/// to 5 min); nothing is reverted for it.
fn error_policy(ks: Arc<DynamicObject>, error: &ReconcileError, ctx: Arc<Ctx>) -> Action {
    let key = key_of(&ks);
    let attempts = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key.clone()).or_default();
            *n += 1;
            *n
        })
        .unwrap_or(1);
    let delay = Duration::from_secs(1u64 << attempts.min(9)).min(Duration::from_secs(300));
    tracing::error!(kustomization = %key, attempts, retry_in = %humantime::format_duration(delay), error = %crate::run::chain(error), "reconcile failed; retrying (nothing reverted)");
    Action::requeue(delay)
}

fn truncate(mut note: String) -> String {
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

impl Ctx {
    /// Whether a pass of `key` may be skipped when git says nothing is
    /// pending under its path: none of its runs needs a pass, and it had a
    /// full pass since the last change of any of its MigrationRuns and
    /// within ten intervals (a full pass also releases database claims
    /// left owed: a release that failed, a run a person acknowledged).
    fn may_skip(&self, key: &str) -> bool {
        let busy = self
            .attention
            .lock()
            .map(|a| a.get(key).is_some_and(|runs| !runs.is_empty()))
            .unwrap_or(true);
        let recent = self
            .last_full
            .lock()
            .map(|l| l.get(key).is_some_and(|at| at.elapsed() < self.interval * 10))
            .unwrap_or(false);
        !busy && recent
    }
    /// Publishes `event` on the Kustomization unless `subject` is what was
    /// last published for it. Returns whether it published.
    async fn publish_once(&self, ks: &DynamicObject, subject: &str, event: &Event) -> bool {
        let key = key_of(ks);
        let mut published = self.published.lock().await;
        if published.get(&key).map(String::as_str) == Some(subject) {
            return false;
        }
        published.insert(key, subject.to_string());
        drop(published);
        if let Err(e) = self
            .recorder
            .publish(event, &ks.object_ref(&kustomization_resource()))
            .await
        {
            tracing::warn!(error = %e, "could not publish the event on the Kustomization");
        }
        true
    }

    /// What the gate waits for, once per change: an Event, and for a
    /// refused commit a `MigrationRun` and the refusal metric.
    async fn publish_wait(&self, ks: &DynamicObject, waiting: Option<&Wait>) {
        let Some(wait) = waiting else {
            self.published.lock().await.remove(&key_of(ks));
            return;
        };
        let (type_, reason) = match wait {
            Wait::Refused { .. } => (EventType::Warning, "MigrationRefused"),
            w if w.needs_person() => (EventType::Warning, "GateNeedsPerson"),
            Wait::RunFailed { .. } => (EventType::Warning, "GateWaitsForRevert"),
            Wait::Retrying { .. } => (EventType::Warning, "GateRetrying"),
            Wait::GateRevert { .. } => (EventType::Normal, "GateHoldsRevert"),
            Wait::Busy { .. } => (EventType::Normal, "DatabaseBusy"),
        };
        let text = wait.to_string();
        // A retry's text changes with every attempt: publish it per cause.
        let subject = match wait {
            Wait::Retrying { step, cause, .. } => format!("retrying {step}: {cause}"),
            _ => text.clone(),
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(text)),
            action: "Gate".into(),
            secondary: None,
        };
        if !self.publish_once(ks, &subject, &event).await {
            return;
        }
        if let Wait::Refused { commit, message } = wait {
            self.metrics.refused(&key_of(ks));
            if let Err(e) = refusal_run(self.engines.client.clone(), ks, commit, message).await {
                tracing::warn!(error = %e, "could not record the refusal as a MigrationRun");
            }
        }
    }
}

/// A `MigrationRun` named `<kustomization>-refused-<commit>` in phase
/// `Refused` (Ready False, Stalled True) saying why: what `kubectl get mrun`
/// shows for a commit the gate will not pass. It carries no run record, so
/// the run store does not list it as a run.
async fn refusal_run(client: kube::Client, ks: &DynamicObject, commit: &str, message: &str) -> Result<(), kube::Error> {
    let ns = ks.metadata.namespace.clone().unwrap_or_default();
    let ks_name = ks.metadata.name.clone().unwrap_or_default();
    let name = format!("{ks_name}-refused-{}", &commit[..commit.len().min(12)]);
    let api: Api<MigrationRun> = Api::namespaced(client, &ns);
    let mut mr = MigrationRun::new(
        &name,
        MigrationRunSpec {
            kustomization: ks_name.clone(),
            commit: commit.to_string(),
            migrations: Vec::new(),
        },
    );
    mr.metadata.labels = Some([(KUSTOMIZATION_LABEL.to_string(), ks_name)].into());
    match api.create(&PostParams::default(), &mr).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let condition = |type_: &str, status: &str| serde_json::json!({"type": type_, "status": status, "reason": "Refused", "message": truncate(message.to_string()), "lastTransitionTime": now});
    let patch = serde_json::json!({"status": {
        "phase": "Refused",
        "summary": truncate(message.to_string()),
        "conditions": [condition("Ready", "False"), condition("Stalled", "True")],
    }});
    api.patch_status(&name, &Default::default(), &kube::api::Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Events on the Kustomization (so Flux alerts see them) and on the MigrationRun.
async fn publish_events(
    recorder: &Recorder,
    client: &kube::Client,
    ks: &DynamicObject,
    run_id: &str,
    outcome: Outcome,
    record: Option<&RunRecord>,
) {
    let (type_, reason) = match outcome {
        Outcome::Succeeded => (EventType::Normal, "MigrationSucceeded"),
        Outcome::RolledBack => (EventType::Warning, "MigrationRolledBack"),
        Outcome::Failed => (EventType::Warning, "MigrationRemediationFailed"),
        Outcome::Deferred => (EventType::Warning, "MigrationDeferred"),
    };
    let commit = record.map(|r| r.commit.short().to_string()).unwrap_or_default();
    let detail = record
        .and_then(|r| r.failure.as_ref())
        .map(|f| format!(": {}", f.message))
        .unwrap_or_default();
    let mut note = format!("run {run_id} for commit {commit}: {outcome:?}{detail}");
    note.truncate(1000);
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Migrate".into(),
        secondary: None,
    };
    let ks_ref = ks.object_ref(&kustomization_resource());
    if let Err(e) = recorder.publish(&event, &ks_ref).await {
        tracing::warn!(error = %e, "could not publish the event on the Kustomization");
    }
    let runs: Api<MigrationRun> =
        Api::namespaced(client.clone(), ks.metadata.namespace.as_deref().unwrap_or("default"));
    if let Ok(mr) = runs.get(run_id).await {
        if let Err(e) = recorder.publish(&event, &mr.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish the event on the MigrationRun");
        }
    }
}

/// Flux GitRepositories in `namespace`.
pub fn git_repositories(client: kube::Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, namespace, &git_repository_resource())
}

fn git_repository_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "source.toolkit.fluxcd.io",
        "v1",
        "GitRepository",
    ))
}

fn kustomization_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kustomize.toolkit.fluxcd.io",
        "v1",
        "Kustomization",
    ))
}
