//! The cluster side of a run in Kubernetes: databases of CloudNativePG
//! clusters resolved through their app Secret, the verified pause of the
//! guarded Kustomization as the run's lock, and promotion that resumes it and
//! waits until Flux reports the new revision Ready.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use serde_json::Value;

use super::pause::{self, KustomizationRef, Paused, Resumed};
use crate::cluster::{Cluster, ClusterError};
use crate::db::Database;
use crate::manifests::DatabaseRef;

/// One guarded Kustomization.
#[derive(Clone)]
pub struct KubeCluster {
    pub client: kube::Client,
    pub kustomization: KustomizationRef,
    /// How long the handshake and the health gate may take.
    pub timeout: Duration,
}

/// The libpq URL in a CNPG app Secret: `uri`, or `host`/`port`/`username`/`password`/`dbname`.
fn secret_url(secret: &Secret) -> Option<String> {
    let get = |k: &str| super::secret_key(secret, k);
    if let Some(uri) = get("uri") {
        return Some(uri);
    }
    let (host, user, password) = (get("host")?, get("username")?, get("password").unwrap_or_default());
    let port = get("port").unwrap_or_else(|| "5432".into());
    let dbname = get("dbname").unwrap_or_else(|| "app".into());
    Some(format!(
        "host={host} port={port} user={user} password='{}' dbname={dbname}",
        password.replace('\'', "\\'")
    ))
}

/// The CA of a CNPG cluster (its `<cluster>-ca` Secret, key `ca.crt`),
/// written to a file libpq and the TLS connector can read. None when there
/// is no such Secret or key (the cluster uses certificates of its own): the
/// connection string's own `sslmode` applies. Any other failure (RBAC, the
/// API, the disk) is an error: never a silent fallback to an unverified
/// connection.
async fn cnpg_ca(
    secrets: &Api<Secret>,
    namespace: &str,
    cluster: &str,
) -> Result<Option<std::path::PathBuf>, ClusterError> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!("{cluster}-ca");
    let secret = match secrets.get_opt(&name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(ClusterError::Other(format!(
                "failed to read Secret {namespace}/{name}, the CA TLS to CNPG cluster {cluster} is verified with: {e}"
            )))
        }
    };
    let Some(ca) = super::secret_key(&secret, "ca.crt") else {
        return Ok(None);
    };
    // Named by content: a file once written never changes under a reader,
    // and two clusters with the same name but different CAs never share one.
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(ca.as_bytes()));
    let dir = ca_dir()
        .map_err(|e| {
            ClusterError::Other(format!(
                "failed to create a private directory for the CAs of CNPG clusters: {e}"
            ))
        })?
        .join(namespace);
    let path = dir.join(format!("{cluster}-{}.crt", &digest[..16]));
    if std::fs::read(&path).is_ok_and(|have| have == ca.as_bytes()) {
        return Ok(Some(path));
    }
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{cluster}.crt.{}.{n}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&tmp, ca.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            ClusterError::Other(format!(
                "failed to write the CA of CNPG cluster {namespace}/{cluster} to {}: {e}",
                path.display()
            ))
        })?;
    Ok(Some(path))
}

/// This process's own directory (mode 0700) for the CAs it writes. Not a
/// fixed path in the shared temp directory: another local user could create
/// that first and swap a CA file between backstop's check of its content and
/// libpq's read, and the connection would trust their CA.
fn ca_dir() -> std::io::Result<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Ok(dir.path());
    }
    use std::os::unix::fs::PermissionsExt;
    // Asked for: tempfile's default follows the umask (0755 here).
    let dir = tempfile::Builder::new()
        .prefix("backstop-cnpg-ca-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()?;
    // A second thread's directory, if it lost the race, is removed here.
    Ok(DIR.get_or_init(|| dir).path())
}

/// `url` with `sslmode=verify-full` and `sslrootcert=<ca>`, unless it names
/// an `sslmode` of its own (the Secret's owner chose).
fn with_verify_full(url: &str, ca: &std::path::Path) -> String {
    if url.contains("sslmode=") {
        return url.to_string();
    }
    let ca = ca.display().to_string();
    if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!(
            "{url}{sep}sslmode=verify-full&sslrootcert={}",
            ca.replace('%', "%25").replace('&', "%26")
        )
    } else {
        format!(
            "{url} sslmode=verify-full sslrootcert='{}'",
            ca.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn resolve(&self, reference: &DatabaseRef, database_name: Option<&str>) -> Result<Database, ClusterError> {
        match reference {
            DatabaseRef::Url { .. } => Ok(Database::from_env(reference, database_name)?),
            DatabaseRef::Cnpg { namespace, cluster } => {
                let name = format!("{cluster}-app");
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let secret = secrets.get(&name).await.map_err(|e| {
                    ClusterError::Other(format!(
                        "failed to read Secret {namespace}/{name} of CNPG cluster {cluster}: {e}"
                    ))
                })?;
                let url = secret_url(&secret).ok_or_else(|| {
                    ClusterError::Other(format!(
                        "Secret {namespace}/{name} has neither `uri` nor `host` and `username`"
                    ))
                })?;
                let url = match cnpg_ca(&secrets, namespace, cluster).await? {
                    Some(ca) => with_verify_full(&url, &ca),
                    None => url,
                };
                Ok(Database::from_url(reference.clone(), &url, database_name)?)
            }
        }
    }

    async fn lock(&self, run_id: &str) -> Result<String, ClusterError> {
        match pause::lock(self.client.clone(), &self.kustomization, run_id, self.timeout).await {
            Ok(Paused::Taken { live_revision, .. }) => Ok(format!(
                "paused {} (confirmed by kustomize-controller); live revision {}",
                self.kustomization,
                live_revision.unwrap_or_else(|| "none".into())
            )),
            Ok(Paused::ByPerson { .. }) => Err(ClusterError::Other(format!(
                "{} is suspended by a person; the run does not start",
                self.kustomization
            ))),
            Err(e) => Err(ClusterError::Other(crate::run::chain(&e))),
        }
    }

    async fn promote(&self, run_id: &str, commit: &str) -> Result<String, ClusterError> {
        pause::unlock(self.client.clone(), &self.kustomization, run_id)
            .await
            .map_err(|e| ClusterError::Other(crate::run::chain(&e)))?;
        let api = pause::kustomizations(self.client.clone(), &self.kustomization.namespace);
        let sha = commit.to_string();
        let healthy = move |o: Option<&kube::api::DynamicObject>| {
            let Some(o) = o else { return false };
            let revision = o.data["status"]["lastAppliedRevision"].as_str().unwrap_or("");
            let ready = o.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c: &Value| c["type"] == "Ready" && c["status"] == "True");
            revision.ends_with(&sha) && ready
        };
        match tokio::time::timeout(self.timeout, await_condition(api, &self.kustomization.name, healthy)).await {
            Ok(Ok(Some(_))) => Ok(format!("{} is Ready at {commit}", self.kustomization)),
            Ok(Ok(None)) => Err(ClusterError::Other(format!(
                "{} was deleted during promotion",
                self.kustomization
            ))),
            Ok(Err(e)) => Err(ClusterError::Other(format!(
                "watching {} failed: {e}",
                self.kustomization
            ))),
            Err(_) => Err(ClusterError::Other(format!(
                "{} did not become Ready at {commit} within {}s",
                self.kustomization,
                self.timeout.as_secs()
            ))),
        }
    }

    async fn release(&self, held: &str, run_id: &str) -> Result<String, ClusterError> {
        let target: KustomizationRef = held
            .parse()
            .map_err(|e: pause::PauseError| ClusterError::Other(e.to_string()))?;
        match pause::unlock(self.client.clone(), &target, run_id).await {
            Ok(Resumed::Resumed) => Ok(format!("resumed {target}: the gate carries the manifest change")),
            Ok(other) => Ok(format!("{target}: {other:?}")),
            Err(e) => Err(ClusterError::Other(crate::run::chain(&e))),
        }
    }

    async fn unlock(&self, run_id: &str, held: Option<&str>) -> Result<String, ClusterError> {
        if held == Some(self.kustomization.to_string().as_str()) {
            return Ok(format!(
                "{} stays suspended: it owns the recovered database cluster and is resumed only once its GitRepository artifact carries the recovery manifest",
                self.kustomization
            ));
        }
        match pause::unlock(self.client.clone(), &self.kustomization, run_id).await {
            Ok(Resumed::Resumed) => Ok(format!("resumed {}", self.kustomization)),
            Ok(Resumed::NotSuspended) => Ok(format!("{} is running", self.kustomization)),
            Ok(Resumed::LeftSuspended) => Ok(format!(
                "{} stays suspended (a person suspended it)",
                self.kustomization
            )),
            Err(e) => Err(ClusterError::Other(crate::run::chain(&e))),
        }
    }

    async fn source_revision(&self, held: &str) -> Result<Option<String>, ClusterError> {
        let target: KustomizationRef = held
            .parse()
            .map_err(|e: pause::PauseError| ClusterError::Other(e.to_string()))?;
        let ks = pause::kustomizations(self.client.clone(), &target.namespace)
            .get(&target.name)
            .await
            .map_err(|e| ClusterError::Other(format!("failed to read Kustomization {target}: {e}")))?;
        let source = &ks.data["spec"]["sourceRef"];
        let ns = source["namespace"].as_str().unwrap_or(&target.namespace);
        let name = source["name"].as_str().unwrap_or_default();
        let repo = super::controller::git_repositories(self.client.clone(), ns)
            .get(name)
            .await
            .map_err(|e| ClusterError::Other(format!("failed to read GitRepository {ns}/{name}: {e}")))?;
        let revision = repo.data["status"]["artifact"]["revision"].as_str().unwrap_or("");
        artifact_sha(revision).map(|sha| Some(sha.to_string())).ok_or_else(|| {
            ClusterError::Other(format!(
                "GitRepository {ns}/{name} has no artifact revision yet ({revision:?})"
            ))
        })
    }
}

/// The commit of a GitRepository artifact revision: `branch@sha1:<sha>`
/// (Flux v1) or `branch/<sha>` (older).
pub fn artifact_sha(revision: &str) -> Option<&str> {
    let sha = revision.rsplit([':', '/']).next()?;
    (sha.len() >= 7 && sha.chars().all(|c| c.is_ascii_hexdigit())).then_some(sha)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cnpg_cas_go_to_one_private_directory_of_this_process() {
        use std::os::unix::fs::PermissionsExt;
        let dir = super::ca_dir().unwrap();
        assert_eq!(super::ca_dir().unwrap(), dir);
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    }

    #[test]
    fn a_cnpg_ca_turns_on_verify_full_unless_the_url_chose_an_sslmode() {
        let ca = std::path::Path::new("/tmp/ca dir/x.crt");
        assert_eq!(
            super::with_verify_full("postgresql://app@db-rw.shop:5432/app", ca),
            "postgresql://app@db-rw.shop:5432/app?sslmode=verify-full&sslrootcert=/tmp/ca dir/x.crt"
        );
        assert_eq!(
            super::with_verify_full("host=db-rw user=app password='x' dbname=app", ca),
            "host=db-rw user=app password='x' dbname=app sslmode=verify-full sslrootcert='/tmp/ca dir/x.crt'"
        );
        let chosen = "postgresql://app@db/app?sslmode=disable";
        assert_eq!(super::with_verify_full(chosen, ca), chosen);
    }

    #[test]
    fn artifact_revisions_name_their_commit() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(super::artifact_sha(&format!("backstop/gate@sha1:{sha}")), Some(sha));
        assert_eq!(super::artifact_sha(&format!("main/{sha}")), Some(sha));
        assert_eq!(super::artifact_sha(""), None);
        assert_eq!(super::artifact_sha("main@sha1:"), None);
    }
}
