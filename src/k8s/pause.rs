//! The verified pause of a Flux Kustomization (DESIGN section 1): one merge
//! patch sets `spec.suspend: true`, a fresh `reconcile.fluxcd.io/requestedAt`
//! token and the `backstop.dev/suspended-by` marker; the pause counts as held
//! only once kustomize-controller has written that token back to
//! `status.lastHandledReconcileAt` (it does so even for a suspended object,
//! after any reconcile that was already running). Only then is
//! `status.lastAppliedRevision` read as what is live. A Kustomization that a
//! person suspended (no marker) is never resumed.

use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde_json::{json, Value};

/// The reconcile-request annotation Flux controllers answer.
pub const REQUESTED_AT: &str = "reconcile.fluxcd.io/requestedAt";
/// Marks a suspension as backstop's, with the owner (a run id, or `cli:<user>`).
pub const SUSPENDED_BY: &str = "backstop.dev/suspended-by";

/// Failures of pause and resume.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("invalid Kustomization reference {0:?} (expected NAMESPACE/NAME)")]
    BadRef(String),
    #[error("failed to {step} Kustomization {target}")]
    Api {
        step: &'static str,
        target: String,
        source: kube::Error,
    },
    #[error("Kustomization {target} is held by {owner}, not by {us}")]
    HeldByOther { target: String, owner: String, us: String },
    #[error("Kustomization {target} was deleted while backstop waited for the pause")]
    Deleted { target: String },
    #[error("failed to watch Kustomization {target}")]
    Watch {
        target: String,
        source: kube::runtime::wait::Error,
    },
    #[error("kustomize-controller did not confirm the pause of {target} within {seconds}s (status.lastHandledReconcileAt never reached the request token); the suspension was undone")]
    NotConfirmed { target: String, seconds: u64 },
}

/// `NAMESPACE/NAME` of a Kustomization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KustomizationRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for KustomizationRef {
    type Err = PauseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(Self {
                namespace: ns.into(),
                name: name.into(),
            }),
            _ => Err(PauseError::BadRef(s.into())),
        }
    }
}

impl std::fmt::Display for KustomizationRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a lock found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Paused {
    /// backstop suspended it and kustomize-controller confirmed.
    Taken {
        token: String,
        live_revision: Option<String>,
    },
    /// A person had suspended it: it is paused, and backstop will not resume it.
    ByPerson { live_revision: Option<String> },
}

/// What an unlock found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    Resumed,
    /// Suspended by a person: left suspended.
    LeftSuspended,
    /// Not suspended: nothing to do.
    NotSuspended,
}

/// The Kustomization API (`kustomize.toolkit.fluxcd.io/v1`).
pub fn kustomizations(client: kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kustomize.toolkit.fluxcd.io", "v1", "Kustomization");
    Api::namespaced_with(client, namespace, &ApiResource::from_gvk(&gvk))
}

fn field<'a>(obj: &'a DynamicObject, path: &[&str]) -> Option<&'a Value> {
    let mut v = &obj.data;
    for p in path {
        v = v.get(*p)?;
    }
    Some(v)
}

fn suspended(obj: &DynamicObject) -> bool {
    field(obj, &["spec", "suspend"])
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn marker(obj: &DynamicObject) -> Option<String> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SUSPENDED_BY))
        .cloned()
}

/// `status.lastAppliedRevision`.
pub fn live_revision(obj: &DynamicObject) -> Option<String> {
    field(obj, &["status", "lastAppliedRevision"])
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Takes the verified pause for `owner`, waiting up to `timeout` for the
/// handshake. When it is not confirmed in time the suspension is undone.
pub async fn lock(
    client: kube::Client,
    target: &KustomizationRef,
    owner: &str,
    timeout: Duration,
) -> Result<Paused, PauseError> {
    let api = kustomizations(client, &target.namespace);
    let err = |step| {
        move |source| PauseError::Api {
            step,
            target: target.to_string(),
            source,
        }
    };
    let obj = api.get(&target.name).await.map_err(err("read"))?;
    match (suspended(&obj), marker(&obj)) {
        (true, None) => {
            return Ok(Paused::ByPerson {
                live_revision: live_revision(&obj),
            })
        }
        (_, Some(other)) if other != owner => {
            return Err(PauseError::HeldByOther {
                target: target.to_string(),
                owner: other,
                us: owner.into(),
            })
        }
        _ => {}
    }
    let token = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let patch = json!({
        "metadata": {"annotations": {REQUESTED_AT: token, SUSPENDED_BY: owner}},
        "spec": {"suspend": true},
    });
    api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(err("suspend"))?;
    let expected = token.clone();
    let handled = move |o: Option<&DynamicObject>| {
        o.and_then(|o| field(o, &["status", "lastHandledReconcileAt"]))
            .and_then(Value::as_str)
            .is_some_and(|v| v == expected)
    };
    match tokio::time::timeout(timeout, await_condition(api.clone(), &target.name, handled)).await {
        Ok(Ok(Some(obj))) => Ok(Paused::Taken {
            token,
            live_revision: live_revision(&obj),
        }),
        Ok(Ok(None)) => Err(PauseError::Deleted {
            target: target.to_string(),
        }),
        Ok(Err(source)) => {
            undo(&api, &target.name).await;
            Err(PauseError::Watch {
                target: target.to_string(),
                source,
            })
        }
        Err(_) => {
            undo(&api, &target.name).await;
            Err(PauseError::NotConfirmed {
                target: target.to_string(),
                seconds: timeout.as_secs(),
            })
        }
    }
}

/// Clears the suspension and backstop's marker.
async fn resume(api: &Api<DynamicObject>, name: &str) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"annotations": {SUSPENDED_BY: null}}, "spec": {"suspend": false}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

async fn undo(api: &Api<DynamicObject>, name: &str) {
    if let Err(e) = resume(api, name).await {
        tracing::error!(kustomization = name, error = %e, "could not undo an unconfirmed suspension");
    }
}

/// Resumes a Kustomization that `owner` suspended; one suspended by a person
/// (no marker) stays suspended.
pub async fn unlock(client: kube::Client, target: &KustomizationRef, owner: &str) -> Result<Resumed, PauseError> {
    let api = kustomizations(client, &target.namespace);
    let err = |step| {
        move |source| PauseError::Api {
            step,
            target: target.to_string(),
            source,
        }
    };
    let obj = api.get(&target.name).await.map_err(err("read"))?;
    match (suspended(&obj), marker(&obj)) {
        (false, None) => Ok(Resumed::NotSuspended),
        (true, None) => Ok(Resumed::LeftSuspended),
        (_, Some(other)) if other != owner => Err(PauseError::HeldByOther {
            target: target.to_string(),
            owner: other,
            us: owner.into(),
        }),
        (_, Some(_)) => {
            resume(&api, &target.name).await.map_err(err("resume"))?;
            Ok(Resumed::Resumed)
        }
    }
}
