//! The engines of guarded Kustomizations: each built from the Kustomization,
//! its GitRepository and their Secrets, cached while those are unchanged,
//! and sharing one git mirror per repository URL (fetched once per burst of
//! passes, however many Kustomizations use it). The mirrors are a cache:
//! everything a run needs to resume is in git and its `MigrationRun`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject};
use sha2::{Digest, Sha256};

use super::cluster::KubeCluster;
use super::controller::{annotation, ControllerOptions, FORGE_REPO, GIT_SECRET, UPSTREAM};
use super::ops::Fence;
use super::pause::KustomizationRef;
use super::store::MigrationRunStore;
use crate::checkpoint::{dump::DumpBackend, Checkpoint};
use crate::forge::NoForge;
use crate::git::{GitAuth, GitRepo};
use crate::manifests::CheckpointKind;
use crate::run::{CheckpointSet, Engine, Settings};
use crate::runner::SqlRunner;

/// Engines by Kustomization, mirrors by repository URL.
pub struct Engines {
    pub client: kube::Client,
    pub opts: ControllerOptions,
    pub bindir: PathBuf,
    pub forge_token: Option<String>,
    /// This leadership's fence, carried by every run-state write.
    pub fence: Option<Fence>,
    engines: tokio::sync::Mutex<HashMap<String, (String, Arc<Engine>)>>,
    mirrors: tokio::sync::Mutex<HashMap<String, GitRepo>>,
}

impl Engines {
    pub fn new(
        client: kube::Client,
        opts: ControllerOptions,
        bindir: PathBuf,
        forge_token: Option<String>,
        fence: Option<Fence>,
    ) -> Self {
        Self {
            client,
            opts,
            bindir,
            forge_token,
            fence,
            engines: Default::default(),
            mirrors: Default::default(),
        }
    }

    /// The engine of `ks`, built anew when the Kustomization's spec or
    /// annotations or its GitRepository's spec changed.
    /// `all`: every Kustomization; the guarded ones following the same
    /// GitRepository share its gate, so their paths are checked too before
    /// this engine moves it.
    pub async fn get(
        &self,
        ks: &DynamicObject,
        all: &[Arc<DynamicObject>],
        repos: &[Arc<DynamicObject>],
    ) -> Result<Arc<Engine>, String> {
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
        let repo = super::controller::git_repositories(self.client.clone(), &source_ns)
            .get(&source_name)
            .await
            .map_err(|e| format!("failed to read GitRepository {source_ns}/{source_name}: {e}"))?;
        let also = also_guarded(ks, &repo, all, repos);
        let fingerprint =
            serde_json::to_string(&(&ks.data["spec"], &ks.metadata.annotations, &repo.data["spec"], &also))
                .unwrap_or_default();
        let key = format!("{ns}/{name}");
        let artifact = repo.data["status"]["artifact"]["revision"].as_str().map(str::to_string);
        let mut engines = self.engines.lock().await;
        let engine = match engines.get(&key) {
            Some((seen, engine)) if *seen == fingerprint => engine.clone(),
            _ => {
                let engine = Arc::new(engine_for(self, ks, &repo, also).await?);
                engines.insert(key, (fingerprint, engine.clone()));
                engine
            }
        };
        engine.git.hint_source(artifact, self.opts.interval);
        Ok(engine)
    }

    /// The one mirror of `url` (under `state/git/<sha256 of the URL>.git`).
    async fn mirror(&self, url: &str) -> Result<GitRepo, String> {
        let mut mirrors = self.mirrors.lock().await;
        if let Some(m) = mirrors.get(url) {
            return Ok(m.clone());
        }
        let (plain, _) = crate::git::split_credentials(url);
        let digest = hex::encode(Sha256::digest(plain.as_bytes()));
        let dir = self.opts.state.join("git").join(format!("{}.git", &digest[..16]));
        std::fs::create_dir_all(self.opts.state.join("git"))
            .map_err(|e| format!("failed to create {}: {e}", self.opts.state.join("git").display()))?;
        // The first use of this mirror by this process (the leader's, with
        // the state directory to itself): a lock file in it is a killed
        // predecessor's, such as the same pod's container before a restart.
        GitRepo::clear_stale_locks(&dir).await;
        let repo = GitRepo::open(&dir, url).await.map_err(|e| crate::run::chain(&e))?;
        mirrors.insert(url.to_string(), repo.clone());
        Ok(repo)
    }
}

/// The normalized `spec.path` of a Kustomization.
fn path_of(ks: &DynamicObject) -> String {
    ks.data["spec"]["path"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches("./")
        .trim_matches('/')
        .to_string()
}

/// The GitRepository (`namespace/name`) a Kustomization follows.
fn source_of(ks: &DynamicObject) -> Option<String> {
    let source = &ks.data["spec"]["sourceRef"];
    if source["kind"] != "GitRepository" {
        return None;
    }
    let ns = source["namespace"]
        .as_str()
        .or(ks.metadata.namespace.as_deref())
        .unwrap_or_default();
    Some(format!("{ns}/{}", source["name"].as_str().unwrap_or_default()))
}

/// The gate a GitRepository serves: its URL (without credentials) and branch.
fn gate_of_repo(repo: &DynamicObject) -> String {
    let url = repo.data["spec"]["url"].as_str().unwrap_or_default();
    let (plain, _) = crate::git::split_credentials(url);
    let branch = repo.data["spec"]["ref"]["branch"].as_str().unwrap_or_default();
    format!("{} {branch}", plain.trim_end_matches('/').trim_end_matches(".git"))
}

/// Paths of the other guarded Kustomizations that deploy from the same
/// gate as `ks` (whose GitRepository is `repo`): the same repository URL
/// and branch, whichever GitRepository objects name them, sorted. A guarded
/// Kustomization whose GitRepository the watch does not know (yet) counts
/// as sharing the gate: checking a path too many only holds the gate back.
pub fn also_guarded(
    ks: &DynamicObject,
    repo: &DynamicObject,
    all: &[Arc<DynamicObject>],
    repos: &[Arc<DynamicObject>],
) -> GatePeers {
    let (me, gate, path) = (
        (&ks.metadata.namespace, &ks.metadata.name),
        gate_of_repo(repo),
        path_of(ks),
    );
    let shares = |o: &DynamicObject| {
        let Some(source) = source_of(o) else {
            return false;
        };
        let known = repos.iter().find(|r| {
            format!(
                "{}/{}",
                r.metadata.namespace.as_deref().unwrap_or_default(),
                r.metadata.name.as_deref().unwrap_or_default()
            ) == source
        });
        known.is_none_or(|r| gate_of_repo(r) == gate)
    };
    let peers: Vec<&Arc<DynamicObject>> = all
        .iter()
        .filter(|o| (&o.metadata.namespace, &o.metadata.name) != me)
        .filter(|o| annotation(o, super::controller::GUARD) == Some("enabled"))
        .filter(|o| shares(o))
        .collect();
    let mut paths: Vec<String> = peers.iter().map(|o| path_of(o)).filter(|p| *p != path).collect();
    paths.sort();
    paths.dedup();
    // The steward: the first by namespace/name of those a person has not
    // suspended (a suspended one does not pass at all).
    let key = |o: &DynamicObject| {
        (
            o.metadata.namespace.clone().unwrap_or_default(),
            o.metadata.name.clone().unwrap_or_default(),
        )
    };
    let steward = peers
        .iter()
        .filter(|o| !super::controller::suspended_by_person(o))
        .all(|o| key(o) > key(ks));
    GatePeers { paths, steward }
}

/// What a guarded Kustomization shares its gate with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatePeers {
    /// The other guarded paths deployed from the gate, sorted.
    pub paths: Vec<String>,
    /// Whether this Kustomization is the gate's steward (see
    /// [`crate::run::Settings::steward`]).
    pub steward: bool,
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
pub(super) async fn secret_value(client: &kube::Client, secret: &str, key: &str) -> Result<String, String> {
    let (ns, name) = secret
        .split_once('/')
        .ok_or_else(|| format!("Secret {secret:?} must be NAMESPACE/NAME"))?;
    let s = read_secret(client, ns, name).await?;
    super::secret_key(&s, key)
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("Secret {secret} has no key {key:?}"))
}

/// `owner/name` from a git URL's path (`https://host/owner/name.git`).
fn repo_path(url: &str) -> String {
    let path = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let path = path.split_once('/').map(|(_, p)| p).unwrap_or("");
    path.trim_end_matches('/').trim_end_matches(".git").to_string()
}

/// Builds the engine for one guarded Kustomization from its GitRepository.
async fn engine_for(
    engines: &Engines,
    ks: &DynamicObject,
    repo: &DynamicObject,
    peers: GatePeers,
) -> Result<Engine, String> {
    let (client, opts, bindir, forge_token) = (
        &engines.client,
        &engines.opts,
        engines.bindir.as_path(),
        engines.forge_token.as_deref(),
    );
    let ns = ks.metadata.namespace.clone().unwrap_or_default();
    let name = ks.metadata.name.clone().unwrap_or_default();
    // `get` checked the sourceRef and read this GitRepository.
    let source_ns = repo.metadata.namespace.clone().unwrap_or_else(|| ns.clone());
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
    let git = engines
        .mirror(&url)
        .await?
        .with_auth(auth)
        .protect(&gate)
        .for_source(&format!(
            "{source_ns}/{}",
            repo.metadata.name.as_deref().unwrap_or_default()
        ));
    // A dump lives in the state folder: on an emptyDir a pod restart or a
    // failover to the other replica loses the checkpoint a run depends on.
    let dump: Arc<dyn Checkpoint> = if opts.durable_state {
        Arc::new(DumpBackend {
            bindir: bindir.to_path_buf().into(),
            store: dir.join("checkpoints"),
        })
    } else {
        Arc::new(crate::checkpoint::Unavailable {
            backend: "dump",
            why: "the controller's --state is not on a durable volume (a pod restart or failover would lose the dump); mount a ReadWriteMany PersistentVolumeClaim at --state (flux/state-pvc.yaml) and pass --durable-state, or use backstop.dev/checkpoint: backup (a CNPG Backup)".into(),
        })
    };
    let mut checkpoints = CheckpointSet::new();
    checkpoints.insert(CheckpointKind::Dump, dump);
    let cnpg: Arc<dyn Checkpoint> = Arc::new(crate::checkpoint::cnpg::CnpgBackend {
        client: client.clone(),
        timeout: opts.timeout,
        policy: opts.base_policy,
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
        last_gate_tree: Default::default(),
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
        store: Arc::new(match &engines.fence {
            Some(fence) => MigrationRunStore::new(client.clone(), &ns, &name, dir.join("runs"))
                .keeping_files(opts.durable_state)
                .fenced(fence.clone()),
            None => {
                MigrationRunStore::new(client.clone(), &ns, &name, dir.join("runs")).keeping_files(opts.durable_state)
            }
        }),
        settings: Settings {
            upstream,
            gate,
            path,
            also_guarded: peers.paths,
            steward: peers.steward,
            revert: None,
            replay_lost_writes: false,
            backoff: Default::default(),
            // One leader-elected controller guards a Kustomization.
            owner: format!("k8s:{ns}/{name}"),
            keep_checkpoints: opts.keep_checkpoints,
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
