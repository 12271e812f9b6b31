//! `backstop controller`: guards every Kustomization annotated
//! `backstop.dev/guard: enabled`. For each, the GitRepository it follows gives
//! the repository URL and the gate branch (`spec.ref.branch`), the annotation
//! `backstop.dev/upstream-branch` the upstream (default `main`), `spec.path`
//! the guarded folder, and the GitRepository's `spec.secretRef` (keys
//! `username`, `password`) the git credentials, unless the Kustomization's
//! `backstop.dev/git-secret` names another Secret (Flux only reads; backstop
//! pushes the gate and reverts). Runs are `MigrationRun`s;
//! the lock is the verified pause; promotion waits for Flux to report the new
//! revision Ready. A pass runs on every change of a Kustomization and every
//! `interval`; Kustomizations are processed one at a time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::watcher;

use super::cluster::KubeCluster;
use super::crd::MigrationRun;
use super::ops::{serve, LeaderElection, Metrics};
use super::pause::{KustomizationRef, SUSPENDED_BY};
use super::store::MigrationRunStore;
use crate::checkpoint::{dump::DumpBackend, Checkpoint};
use crate::forge::NoForge;
use crate::git::{GitAuth, GitRepo};
use crate::manifests::CheckpointKind;
use crate::run::{CheckpointSet, Engine, Settings};
use crate::run::{Outcome, RunRecord};
use crate::runner::SqlRunner;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Resource;

/// Annotation that puts a Kustomization under guard.
pub const GUARD: &str = "backstop.dev/guard";
/// Annotation naming the upstream branch.
pub const UPSTREAM: &str = "backstop.dev/upstream-branch";
/// Annotation naming the Secret (`username`, `password`) backstop pushes with,
/// when it differs from the GitRepository's read credentials.
pub const GIT_SECRET: &str = "backstop.dev/git-secret";

/// Failures that stop the controller (a single Kustomization's failure does not).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Client(#[from] super::ClientError),
    #[error("failed to list Kustomizations")]
    List(#[source] kube::Error),
    #[error("PostgreSQL client programs are needed for dump checkpoints")]
    Bin(#[from] crate::pgbin::PgBinError),
    #[error(transparent)]
    Ops(#[from] super::ops::OpsError),
    #[error("lost the leader lease to another replica; stopping so that only one acts")]
    LostLease,
    #[error("forge configuration: {0}")]
    Forge(String),
}

/// Reads the Secret `namespace/name`.
async fn read_secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Secret, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    secrets
        .get(name)
        .await
        .map_err(|e| format!("failed to read Secret {namespace}/{name}: {e}"))
}

/// One key of a Secret named `NAMESPACE/NAME`.
async fn secret_value(client: &kube::Client, secret: &str, key: &str) -> Result<String, String> {
    let (ns, name) = secret
        .split_once('/')
        .ok_or_else(|| format!("Secret {secret:?} must be NAMESPACE/NAME"))?;
    let s = read_secret(client, ns, name).await?;
    super::secret_key(&s, key)
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("Secret {secret} has no key {key:?}"))
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

/// Annotation naming the repository on the forge (`owner/name`, or the GitLab
/// project path); default: the path of the GitRepository URL.
pub const FORGE_REPO: &str = "backstop.dev/forge-repo";

/// `owner/name` from a git URL's path (`https://host/owner/name.git`).
fn repo_path(url: &str) -> String {
    let path = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let path = path.split_once('/').map(|(_, p)| p).unwrap_or("");
    path.trim_end_matches('/').trim_end_matches(".git").to_string()
}

fn annotation<'a>(obj: &'a DynamicObject, key: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Runs until interrupted.
pub async fn run(opts: ControllerOptions) -> Result<(), ControllerError> {
    let client = super::client(opts.kubeconfig.as_deref()).await?;
    let bindir = crate::pgbin::bindir()?;
    let metrics = Arc::new(Metrics::default());
    serve(&opts.metrics_addr, metrics.clone()).await?;
    let election = LeaderElection {
        api: Api::namespaced(client.clone(), &opts.lease.0),
        namespace: opts.lease.0.clone(),
        name: opts.lease.1.clone(),
        identity: opts.identity.clone(),
        duration: Duration::from_secs(15),
    };
    while !election.try_acquire().await? {
        tracing::info!(lease = %election.name, "another replica leads; waiting");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    metrics.set_leader(true);
    tracing::info!(identity = %opts.identity, "leading");
    let (lost_tx, lost) = tokio::sync::watch::channel(false);
    let renewing = election.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(renewing.duration / 3).await;
            if !matches!(renewing.try_acquire().await, Ok(true)) {
                let _ = lost_tx.send(true);
                return;
            }
        }
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "backstop".into(),
            instance: Some(opts.identity.clone()),
        },
    );
    // The forge token, read once; never logged.
    let forge_token = match &opts.forge {
        Some(f) => Some(
            secret_value(&client, &f.token_secret, "token")
                .await
                .map_err(ControllerError::Forge)?,
        ),
        None => None,
    };
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &kustomization_resource());
    let wake = Arc::new(tokio::sync::Notify::new());
    let notify = wake.clone();
    let watch_api = all.clone();
    tokio::spawn(async move {
        let mut events = watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            if event.is_ok() {
                notify.notify_one();
            }
        }
    });
    let mut engines: HashMap<String, Arc<Engine>> = HashMap::new();
    tracing::info!(state = %opts.state.display(), "controller started");
    loop {
        if *lost.borrow() {
            metrics.set_leader(false);
            return Err(ControllerError::LostLease);
        }
        let list = all.list(&ListParams::default()).await.map_err(ControllerError::List)?;
        for ks in list.items.iter().filter(|k| annotation(k, GUARD) == Some("enabled")) {
            let (Some(ns), Some(name)) = (ks.metadata.namespace.clone(), ks.metadata.name.clone()) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let span = tracing::info_span!("kustomization", kustomization = %key);
            let _enter = span.enter();
            let suspended = ks.data["spec"]["suspend"].as_bool().unwrap_or(false);
            if suspended && annotation(ks, SUSPENDED_BY).is_none() {
                tracing::info!("suspended by a person; waiting");
                continue;
            }
            let engine = match engines.get(&key) {
                Some(e) => e.clone(),
                None => match engine_for(&client, ks, &opts, &bindir, forge_token.as_deref()).await {
                    Ok(e) => {
                        let e = Arc::new(e);
                        engines.insert(key.clone(), e.clone());
                        e
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot guard this Kustomization");
                        continue;
                    }
                },
            };
            drop(_enter);
            match engine.pass().await {
                Ok(report) => {
                    for (id, outcome, location) in &report.runs {
                        tracing::info!(kustomization = %key, run = %id, outcome = ?outcome, report = %location, "run finished");
                        let record = engine
                            .store
                            .list()
                            .await
                            .ok()
                            .and_then(|runs| runs.into_iter().find(|r| &r.id == id));
                        if let Some(run) = &record {
                            for step in &run.steps {
                                if let Some(end) = step.finished_at {
                                    metrics.step(
                                        &step_kind(&step.name),
                                        (end - step.started_at).num_milliseconds() as f64 / 1000.0,
                                    );
                                }
                            }
                        }
                        let failure = record
                            .as_ref()
                            .and_then(|r| r.failure.as_ref())
                            .map(|f| f.phase.to_string());
                        metrics.run_finished(&format!("{outcome:?}"), failure.as_deref());
                        publish_events(&recorder, &client, ks, id, *outcome, record.as_ref()).await;
                    }
                    if let Some(w) = report.waiting {
                        tracing::warn!(kustomization = %key, "waiting: {w}");
                    }
                }
                Err(e) => tracing::error!(kustomization = %key, error = %crate::run::chain(&e), "pass failed"),
            }
        }
        metrics.set_ready(true);
        tokio::select! {
            _ = tokio::time::sleep(opts.interval) => {}
            _ = wake.notified() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `migrate 0001-x` → `migrate`: metrics label by step kind, not migration.
fn step_kind(name: &str) -> String {
    name.split_whitespace().next().unwrap_or(name).to_string()
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
    let gvk = GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository");
    Api::namespaced_with(client, namespace, &ApiResource::from_gvk(&gvk))
}

fn kustomization_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kustomize.toolkit.fluxcd.io",
        "v1",
        "Kustomization",
    ))
}

/// Builds the engine for one guarded Kustomization from its GitRepository.
async fn engine_for(
    client: &kube::Client,
    ks: &DynamicObject,
    opts: &ControllerOptions,
    bindir: &std::path::Path,
    forge_token: Option<&str>,
) -> Result<Engine, String> {
    let ns = ks.metadata.namespace.clone().unwrap_or_default();
    let name = ks.metadata.name.clone().unwrap_or_default();
    let source = &ks.data["spec"]["sourceRef"];
    if source["kind"] != "GitRepository" {
        return Err(format!(
            "spec.sourceRef must be a GitRepository, found {}",
            source["kind"]
        ));
    }
    let source_ns = source["namespace"].as_str().unwrap_or(&ns).to_string();
    let source_name = source["name"].as_str().unwrap_or_default().to_string();
    let gvk = GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository");
    let repos: Api<DynamicObject> = Api::namespaced_with(client.clone(), &source_ns, &ApiResource::from_gvk(&gvk));
    let repo = repos
        .get(&source_name)
        .await
        .map_err(|e| format!("failed to read GitRepository {source_ns}/{source_name}: {e}"))?;
    let url = repo.data["spec"]["url"]
        .as_str()
        .ok_or("the GitRepository has no spec.url")?
        .to_string();
    let gate = repo.data["spec"]["ref"]["branch"]
        .as_str()
        .ok_or("the GitRepository must follow a branch (spec.ref.branch): the gate")?
        .to_string();
    // Credentials: the Secret `backstop.dev/git-secret` names (in the
    // Kustomization's namespace), else the GitRepository's own secretRef.
    let (secret_ns, secret_name) = match annotation(ks, GIT_SECRET) {
        Some(name) => (ns.clone(), Some(name.to_string())),
        None => (
            source_ns.clone(),
            repo.data["spec"]["secretRef"]["name"].as_str().map(str::to_string),
        ),
    };
    let auth = match secret_name.as_deref() {
        Some(secret) => {
            let s = read_secret(client, &secret_ns, secret).await?;
            let get = |k: &str| super::secret_key(&s, k);
            match (get("username"), get("password")) {
                (Some(username), Some(token)) => GitAuth::Token { username, token },
                _ => {
                    return Err(format!(
                        "Secret {secret_ns}/{secret} needs `username` and `password` keys"
                    ))
                }
            }
        }
        None => GitAuth::None,
    };
    let dir = opts.state.join(&ns).join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    let git = GitRepo::open(&dir.join("mirror.git"), &url)
        .await
        .map_err(|e| crate::run::chain(&e))?
        .with_auth(auth)
        .protect(&gate);
    let dump: Arc<dyn Checkpoint> = Arc::new(DumpBackend {
        bindir: bindir.to_path_buf(),
        store: dir.join("checkpoints"),
    });
    let mut checkpoints = CheckpointSet::new();
    checkpoints.insert(CheckpointKind::Dump, dump);
    let cnpg: Arc<dyn Checkpoint> = Arc::new(crate::checkpoint::cnpg::CnpgBackend {
        client: client.clone(),
        timeout: opts.timeout,
    });
    checkpoints.insert(CheckpointKind::Backup, cnpg);
    let forge: Arc<dyn crate::forge::Forge> = match (&opts.forge, forge_token) {
        (Some(f), Some(token)) => crate::local::ForgeConfig {
            kind: f.kind,
            url: f.url.clone(),
            repo: annotation(ks, FORGE_REPO)
                .map(str::to_string)
                .unwrap_or_else(|| repo_path(&url)),
            token: token.to_string(),
            retry: f.retry,
        }
        .build()
        .map_err(|e| e.to_string())?,
        _ => Arc::new(NoForge),
    };
    let path = ks.data["spec"]["path"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches("./")
        .to_string();
    let upstream = annotation(ks, UPSTREAM).unwrap_or("main").to_string();
    let target = KustomizationRef {
        namespace: ns.clone(),
        name: name.clone(),
    };
    Ok(Engine {
        git,
        cluster: Arc::new(KubeCluster {
            client: client.clone(),
            kustomization: target,
            timeout: opts.timeout,
        }),
        runner: Arc::new(super::job::KubeRunner {
            client: client.clone(),
            sql: SqlRunner,
        }),
        checkpoints,
        forge,
        store: Arc::new(MigrationRunStore::new(client.clone(), &ns, &name, dir.join("runs"))),
        settings: Settings {
            upstream,
            gate,
            path,
            revert: None,
            backoff: Default::default(),
            // One leader-elected controller guards a Kustomization.
            owner: format!("k8s:{ns}/{name}"),
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn forge_repository_comes_from_the_git_url_path() {
        assert_eq!(super::repo_path("https://github.com/platform/sre.git"), "platform/sre");
        assert_eq!(
            super::repo_path("https://gitlab.example.com/group/sub/sre"),
            "group/sub/sre"
        );
    }
}
