//! The controller's operational surface: leader election on a
//! `coordination.k8s.io/v1` Lease (one active replica), Prometheus metrics,
//! and the `/healthz`, `/readyz`, `/metrics` endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Failures of leader election and the HTTP endpoints.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("failed to read or write Lease {namespace}/{name}")]
    Lease {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("failed to listen on {addr}")]
    Listen { addr: String, source: std::io::Error },
}

/// The controller's metrics, kept in a `prometheus-client` registry and
/// served in the OpenMetrics text format.
pub struct Metrics {
    registry: Registry,
    runs: Family<Vec<(String, String)>, Counter>,
    failures: Family<Vec<(String, String)>, Counter>,
    steps: Family<Vec<(String, String)>, Histogram>,
    refusals: Family<Vec<(String, String)>, Counter>,
    reconciled_gauge: Gauge,
    reconciled: Mutex<std::collections::BTreeSet<String>>,
    leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let runs = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("backstop_runs", "Runs finished, by outcome", runs.clone());
        let failures = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "backstop_run_failures",
            "Failed runs, by the phase that failed",
            failures.clone(),
        );
        let steps = Family::<Vec<(String, String)>, Histogram>::new_with_constructor(|| {
            Histogram::new([0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 1800.0])
        });
        registry.register_with_unit(
            "backstop_step_duration",
            "Time spent in run steps",
            Unit::Seconds,
            steps.clone(),
        );
        let refusals = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "backstop_refusals",
            "Commits the gate refused, by Kustomization",
            refusals.clone(),
        );
        let reconciled_gauge = Gauge::default();
        registry.register(
            "backstop_kustomizations_reconciled",
            "Guarded Kustomizations reconciled at least once by this process",
            reconciled_gauge.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "backstop_leader",
            "Whether this replica holds the lease",
            leader.clone(),
        );
        Self {
            registry,
            runs,
            failures,
            steps,
            refusals,
            reconciled_gauge,
            reconciled: Mutex::default(),
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

fn label(key: &str, value: &str) -> Vec<(String, String)> {
    vec![(key.to_string(), value.to_string())]
}

impl Metrics {
    /// A finished run: its outcome, failure phase and step timings.
    pub fn record_run(&self, outcome: crate::run::Outcome, record: Option<&crate::run::RunRecord>) {
        if let Some(run) = record {
            for step in &run.steps {
                if let Some(end) = step.finished_at {
                    let kind = step.name.split_whitespace().next().unwrap_or(&step.name);
                    self.steps
                        .get_or_create(&label("step", kind))
                        .observe((end - step.started_at).num_milliseconds() as f64 / 1000.0);
                }
            }
        }
        self.runs
            .get_or_create(&label("outcome", &format!("{outcome:?}")))
            .inc();
        if let Some(f) = record.and_then(|r| r.failure.as_ref()) {
            self.failures
                .get_or_create(&label("reason", &f.phase.to_string()))
                .inc();
        }
    }

    /// A reconcile of `kustomization` completed (the gauge counts distinct
    /// Kustomizations: it reaches their number after the first full pass).
    pub fn reconciled(&self, kustomization: &str) {
        if let Ok(mut m) = self.reconciled.lock() {
            if m.insert(kustomization.to_string()) {
                self.reconciled_gauge.set(m.len() as i64);
            }
        }
    }

    /// The gate of `kustomization` refused a commit (counted once per refusal).
    pub fn refused(&self, kustomization: &str) {
        self.refusals
            .get_or_create(&label("kustomization", kustomization))
            .inc();
    }

    pub fn set_leader(&self, v: bool) {
        self.leader.set(i64::from(v));
    }

    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::Relaxed);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        s
    }
}

/// Serves `/healthz` (alive), `/readyz` (started: client and endpoints up,
/// leader or not) and `/metrics`, with hyper (HTTP/1.1).
pub async fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<tokio::task::JoinHandle<()>, OpsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Listen {
            addr: addr.into(),
            source,
        })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(req.uri().path(), &metrics)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    }))
}

fn answer(path: &str, metrics: &Metrics) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" if metrics.is_ready() => (200, "text/plain", "ok\n".to_string()),
        "/readyz" => (503, "text/plain", "not ready\n".to_string()),
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// Leader election on a Lease.
#[derive(Clone)]
pub struct LeaderElection {
    pub api: Api<Lease>,
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaderElection {
    fn err(&self) -> impl FnOnce(kube::Error) -> OpsError + '_ {
        |source| OpsError::Lease {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// One attempt: takes or renews the lease; `Ok(None)` while another
    /// replica holds a lease that has not expired. A conflicting write (someone
    /// else took it in between) is a `None` too. `Some(transitions)`: this
    /// replica holds it, and the lease changed hands that many times (the
    /// fencing token of this leadership).
    pub async fn try_acquire(&self) -> Result<Option<i32>, OpsError> {
        let now = Timestamp::now();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        };
        match self.api.get_opt(&self.name).await.map_err(self.err())? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        acquire_time: Some(MicroTime(now)),
                        // A Lease made anew (deleted by someone) must not
                        // restart the count below fences already written:
                        // start from the clock, which only grows.
                        lease_transitions: Some(created_transitions(now)),
                        ..spec
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Some(created_transitions(now))),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                    Err(e) => Err(self.err()(e)),
                }
            }
            Some(mut lease) => {
                let current = lease.spec.clone().unwrap_or_default();
                let ours = current.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = current.renew_time.as_ref().is_none_or(|t| {
                    let ttl = i64::from(current.lease_duration_seconds.unwrap_or(15));
                    t.0.as_second() + ttl < now.as_second()
                });
                if !ours && !expired {
                    return Ok(None);
                }
                let acquire_time = if ours {
                    current.acquire_time.clone()
                } else {
                    Some(MicroTime(now))
                };
                let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
                lease.spec = Some(LeaseSpec {
                    acquire_time,
                    lease_transitions: Some(transitions),
                    ..spec
                });
                // Replace carries the resourceVersion: a concurrent taker makes this a 409.
                match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(Some(transitions)),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                    Err(e) => Err(self.err()(e)),
                }
            }
        }
    }

    /// The fence of the leadership `try_acquire` returned `transitions` for.
    pub fn fence(&self, transitions: i32) -> Fence {
        Fence {
            election: self.clone(),
            transitions,
        }
    }
}

/// The transition count a newly created Lease starts at: seconds since
/// 2020, so that it exceeds any count a deleted Lease reached by takeovers.
fn created_transitions(now: Timestamp) -> i32 {
    i32::try_from(now.as_second() - 1_577_836_800).unwrap_or(i32::MAX / 2)
}

/// One leadership of this replica: writes of run state carry its token and
/// are refused once the Lease names another holder or a later transition,
/// so a replica that lost the lease can never write a step after the next
/// leader took over.
#[derive(Clone)]
pub struct Fence {
    election: LeaderElection,
    transitions: i32,
}

/// A write refused because this replica's leadership is over.
#[derive(Debug, thiserror::Error)]
#[error("this replica ({token}) no longer leads: {why}")]
pub struct Fenced {
    pub token: String,
    pub why: String,
}

impl Fence {
    /// `holder/transitions`, stored with every run-state write.
    pub fn token(&self) -> String {
        format!("{}/{}", self.election.identity, self.transitions)
    }

    /// The transition count of a stored token (None: not a token).
    pub fn transitions_of(token: &str) -> Option<i32> {
        token.rsplit_once('/').and_then(|(_, n)| n.parse().ok())
    }

    /// Ok while the Lease still names this leadership and has not expired.
    pub async fn check(&self) -> Result<(), Fenced> {
        let fenced = |why: String| Fenced {
            token: self.token(),
            why,
        };
        let lease = self
            .election
            .api
            .get(&self.election.name)
            .await
            .map_err(|e| fenced(format!("the Lease cannot be read: {e}")))?;
        let spec = lease.spec.unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(15));
        let expired = spec
            .renew_time
            .is_none_or(|t| t.0.as_second() + ttl < Timestamp::now().as_second());
        if holder != self.election.identity || transitions != self.transitions {
            return Err(fenced(format!(
                "the Lease is held by {holder} (transition {transitions})"
            )));
        }
        if expired {
            return Err(fenced("the Lease expired".into()));
        }
        Ok(())
    }

    /// Whether a status written under `stored` may be overwritten by this
    /// leadership (no later leadership wrote it).
    pub fn may_overwrite(&self, stored: Option<&str>) -> bool {
        stored
            .and_then(Self::transitions_of)
            .is_none_or(|theirs| theirs <= self.transitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_the_openmetrics_text_format() {
        let m = Metrics::default();
        m.record_run(crate::run::Outcome::Succeeded, None);
        m.refused("default/shop");
        m.reconciled("default/shop");
        m.reconciled("default/shop");
        m.set_leader(true);
        let text = m.render();
        for line in [
            "backstop_runs_total{outcome=\"Succeeded\"} 1",
            "backstop_refusals_total{kustomization=\"default/shop\"} 1",
            "backstop_kustomizations_reconciled 1",
            "backstop_leader 1",
            "# TYPE backstop_step_duration_seconds histogram",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing in:\n{text}");
        }
    }
}
