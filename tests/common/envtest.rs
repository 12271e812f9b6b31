//! A real Kubernetes control plane for tests, the envtest way: etcd and
//! kube-apiserver from `$KUBEBUILDER_ASSETS`, on free loopback ports, with the
//! upstream Flux and CNPG CRDs (copies in tests/crds/) and backstop's own.
//! Without `KUBEBUILDER_ASSETS` the tests say they are skipped, except in CI
//! (`CI` set), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

pub struct ControlPlane {
    children: Vec<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub client: kube::Client,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log(dir: &tempfile::TempDir, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join(name))
        .unwrap()
}

/// Spawns `spawn(attempt)` until its health URL answers 2xx; a child that
/// exits first (its port was taken) is retried with the fresh ports the next
/// call picks. Panics with the tail of `<name>.log` after 5 attempts or 60 s.
async fn start_until_up(
    dir: &tempfile::TempDir,
    name: &str,
    mut spawn: impl FnMut(u32) -> (Child, u16, String),
) -> (Child, u16) {
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for attempt in 0..5 {
        let (mut child, port, url) = spawn(attempt);
        for _ in 0..240 {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            let up = http
                .get(&url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .is_some();
            if up {
                return (child, port);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("{name} did not come up on port {port} (attempt {attempt}); retrying on fresh ports");
    }
    let file = if name == "etcd" { "etcd.log" } else { "apiserver.log" };
    let log = std::fs::read_to_string(dir.path().join(file)).unwrap_or_default();
    panic!(
        "{name} not ready after 5 attempts:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The assets folder, or None (skip) outside CI.
pub fn assets() -> Option<PathBuf> {
    match std::env::var("KUBEBUILDER_ASSETS") {
        Ok(dir) if Path::new(&dir).join("kube-apiserver").exists() => Some(PathBuf::from(dir)),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must set KUBEBUILDER_ASSETS to a folder with etcd and kube-apiserver"
            );
            eprintln!("skipped: KUBEBUILDER_ASSETS does not name a folder with etcd and kube-apiserver");
            None
        }
    }
}

/// `token,user,uid[,group]` lines the API server accepts as bearer tokens.
pub const ADMIN_TOKEN: &str = "admin-token";

impl ControlPlane {
    /// Starts etcd and kube-apiserver and installs the CRDs. `tokens` are
    /// extra lines for tokens.csv (e.g. a token for an RBAC-limited user).
    pub async fn start(tokens: &[&str]) -> Option<Self> {
        let bin = assets()?;
        let dir = tempfile::tempdir().unwrap();
        // A port picked free can be taken (by another test's server or an
        // outgoing connection) before etcd binds it: start etcd until it
        // answers, with fresh ports each time.
        let (etcd, etcd_port) = start_until_up(&dir, "etcd", |attempt| {
            let (etcd_port, peer_port) = (free_port(), free_port());
            let child = Command::new(bin.join("etcd"))
                .arg("--data-dir")
                .arg(dir.path().join(format!("etcd-{attempt}")))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"))
                .stdout(Stdio::null())
                .stderr(log(&dir, "etcd.log"))
                .spawn()
                .expect("start etcd");
            (child, etcd_port, format!("http://127.0.0.1:{etcd_port}/health"))
        })
        .await;
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let sa = certs.join("sa.key");
        assert!(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success());
        assert!(Command::new("openssl")
            .args(["rsa", "-in"])
            .arg(&sa)
            .args(["-pubout", "-out"])
            .arg(certs.join("sa.pub"))
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success());
        let mut csv = format!("{ADMIN_TOKEN},admin,admin,system:masters\n");
        for t in tokens {
            csv.push_str(t);
            csv.push('\n');
        }
        std::fs::write(dir.path().join("tokens.csv"), csv).unwrap();
        let (apiserver, port) = start_until_up(&dir, "kube-apiserver", |_| {
            let port = free_port();
            let child = Command::new(bin.join("kube-apiserver"))
                .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
                .arg(format!("--cert-dir={}", certs.display()))
                .arg(format!("--secure-port={port}"))
                .args([
                    "--bind-address=127.0.0.1",
                    "--insecure-port=0",
                    "--service-account-issuer=https://kubernetes.default.svc",
                ])
                .arg(format!("--service-account-key-file={}", certs.join("sa.pub").display()))
                .arg(format!("--service-account-signing-key-file={}", sa.display()))
                .arg(format!("--token-auth-file={}", dir.path().join("tokens.csv").display()))
                .args([
                    "--authorization-mode=RBAC",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                ])
                .stdout(Stdio::null())
                .stderr(log(&dir, "apiserver.log"))
                .spawn()
                .expect("start kube-apiserver");
            (child, port, format!("https://127.0.0.1:{port}/readyz"))
        })
        .await;
        let kubeconfig = kubeconfig(port, ADMIN_TOKEN);
        std::fs::write(dir.path().join("kubeconfig"), &kubeconfig).unwrap();
        let plane = Self {
            children: vec![etcd, apiserver],
            dir,
            port,
            client: client_for(port, ADMIN_TOKEN).await,
        };
        plane.install_crds().await;
        Some(plane)
    }

    async fn install_crds(&self) {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut docs: Vec<String> = Vec::new();
        for f in [
            "flux-kustomizations.yaml",
            "flux-gitrepositories.yaml",
            "cnpg-clusters.yaml",
            "cnpg-backups.yaml",
        ] {
            docs.push(std::fs::read_to_string(format!("{}/tests/crds/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap());
        }
        docs.push(backstop::k8s::crd::crds_yaml().unwrap());
        let mut names = Vec::new();
        for text in docs {
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(doc).unwrap();
                if value.is_null() {
                    continue;
                }
                let crd: CustomResourceDefinition = serde_yaml::from_value(value).unwrap();
                names.push(crd.metadata.name.clone().unwrap());
                // Create, not apply: the CNPG Cluster CRD is too large for the
                // last-applied annotation.
                api.create(&PostParams::default(), &crd).await.unwrap();
            }
        }
        for name in names {
            let established = kube::runtime::wait::conditions::is_crd_established();
            tokio::time::timeout(
                Duration::from_secs(30),
                kube::runtime::wait::await_condition(api.clone(), &name, established),
            )
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established"))
            .unwrap();
        }
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }
}

use serde::Deserialize;

pub fn kubeconfig(port: u16, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: envtest, cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}}}]\n\
         users: [{{name: u, user: {{token: {token}}}}}]\ncontexts: [{{name: envtest, context: {{cluster: envtest, user: u}}}}]\ncurrent-context: envtest\n"
    )
}

/// A client authenticated with `token`.
pub async fn client_for(port: u16, token: &str) -> kube::Client {
    let kc: kube::config::Kubeconfig = serde_yaml::from_str(&kubeconfig(port, token)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// Creates every document of a YAML text (RBAC objects, ServiceAccounts,
/// Namespaces), putting namespaced ones in `namespace` when given.
pub async fn create_all(client: &kube::Client, text: &str, namespace: Option<&str>) {
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    for doc in serde_yaml::Deserializer::from_str(text) {
        let mut value = serde_yaml::Value::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        if let (Some(ns), Some(meta)) = (namespace, value.get_mut("metadata")) {
            if meta.get("namespace").is_some() {
                meta["namespace"] = ns.into();
            }
        }
        let kind = value["kind"].as_str().unwrap().to_string();
        let ns = value["metadata"]["namespace"].as_str().map(str::to_string);
        let pp = PostParams::default();
        macro_rules! create {
            ($t:ty, namespaced) => {{
                let obj: $t = serde_yaml::from_value(value).unwrap();
                Api::<$t>::namespaced(client.clone(), ns.as_deref().unwrap())
                    .create(&pp, &obj)
                    .await
                    .unwrap();
            }};
            ($t:ty) => {{
                let obj: $t = serde_yaml::from_value(value).unwrap();
                Api::<$t>::all(client.clone()).create(&pp, &obj).await.unwrap();
            }};
        }
        match kind.as_str() {
            "Namespace" => create!(Namespace),
            "ServiceAccount" => create!(ServiceAccount, namespaced),
            "ClusterRole" => create!(ClusterRole),
            "ClusterRoleBinding" => create!(ClusterRoleBinding),
            "Role" => create!(Role, namespaced),
            "RoleBinding" => create!(RoleBinding, namespaced),
            other => panic!("create_all does not handle {other}"),
        }
    }
}

/// kustomize-controller's answer to a reconcile request: it writes the request
/// token to `status.lastHandledReconcileAt` (for suspended objects too).
/// Returns whether there was a request to answer and the answer was written.
pub async fn answer_reconcile_request(api: &Api<kube::api::DynamicObject>, obj: &kube::api::DynamicObject) -> bool {
    let Some(token) = reconcile_request(obj) else {
        return false;
    };
    let name = obj.metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({"status": {"lastHandledReconcileAt": token}});
    api.patch_status(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .is_ok()
}

/// The reconcile request token of `obj` that is not answered yet.
pub fn reconcile_request(obj: &kube::api::DynamicObject) -> Option<String> {
    let requested = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(backstop::k8s::pause::REQUESTED_AT))
        .cloned();
    let handled = obj.data["status"]["lastHandledReconcileAt"]
        .as_str()
        .map(str::to_string);
    requested.filter(|t| Some(t) != handled.as_ref())
}
