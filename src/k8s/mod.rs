//! Kubernetes: the `MigrationRun` resource and its run store, the verified
//! pause of Flux Kustomizations, the cluster side of a run, the controller
//! that guards Kustomizations, and the client they use.

pub mod cluster;
pub mod controller;
pub mod crd;
pub mod engines;
pub mod job;
pub mod ops;
pub mod pause;
pub mod store;

use std::path::Path;

/// Failures to build a Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to read kubeconfig {path}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("failed to find Kubernetes credentials (in-cluster or $KUBECONFIG)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("failed to create the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or inferred (in-cluster, `$KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc_err = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(kc_err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(kc_err)?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Client)
}

/// A key of a Secret as text.
pub fn secret_key(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}
