//! The controller's operational surface: leader election on a
//! `coordination.k8s.io/v1` Lease (one active replica), Prometheus metrics,
//! and the `/healthz`, `/readyz`, `/metrics` endpoints.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Counters and timings, rendered in the Prometheus text format.
#[derive(Debug, Default)]
pub struct Metrics {
    runs: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<BTreeMap<String, u64>>,
    steps: Mutex<BTreeMap<String, (f64, u64)>>,
    refusals: Mutex<BTreeMap<String, u64>>,
    reconciled: Mutex<std::collections::BTreeSet<String>>,
    leader: Mutex<bool>,
    ready: Mutex<bool>,
}

impl Metrics {
    /// A finished run: its outcome, failure phase and step timings.
    pub fn record_run(&self, outcome: crate::run::Outcome, record: Option<&crate::run::RunRecord>) {
        if let Some(run) = record {
            for step in &run.steps {
                if let Some(end) = step.finished_at {
                    let kind = step.name.split_whitespace().next().unwrap_or(&step.name);
                    self.step(kind, (end - step.started_at).num_milliseconds() as f64 / 1000.0);
                }
            }
        }
        let failure = record.and_then(|r| r.failure.as_ref()).map(|f| f.phase.to_string());
        self.run_finished(&format!("{outcome:?}"), failure.as_deref());
    }

    /// A reconcile of `kustomization` completed (the gauge counts distinct
    /// Kustomizations: it reaches their number after the first full pass).
    pub fn reconciled(&self, kustomization: &str) {
        if let Ok(mut m) = self.reconciled.lock() {
            if !m.contains(kustomization) {
                m.insert(kustomization.to_string());
            }
        }
    }

    /// The gate of `kustomization` refused a commit (counted once per refusal).
    pub fn refused(&self, kustomization: &str) {
        if let Ok(mut m) = self.refusals.lock() {
            *m.entry(kustomization.into()).or_default() += 1;
        }
    }

    /// A finished run with its outcome (`Succeeded`, `RolledBack`, `Failed`).
    pub fn run_finished(&self, outcome: &str, failure_reason: Option<&str>) {
        if let Ok(mut m) = self.runs.lock() {
            *m.entry(outcome.into()).or_default() += 1;
        }
        if let (Some(reason), Ok(mut m)) = (failure_reason, self.failures.lock()) {
            *m.entry(reason.into()).or_default() += 1;
        }
    }

    /// A step took `seconds`.
    pub fn step(&self, name: &str, seconds: f64) {
        if let Ok(mut m) = self.steps.lock() {
            let e = m.entry(name.into()).or_default();
            e.0 += seconds;
            e.1 += 1;
        }
    }

    pub fn set_leader(&self, v: bool) {
        if let Ok(mut l) = self.leader.lock() {
            *l = v;
        }
    }

    pub fn set_ready(&self, v: bool) {
        if let Ok(mut r) = self.ready.lock() {
            *r = v;
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.lock().map(|r| *r).unwrap_or(false)
    }

    /// The Prometheus exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP backstop_runs_total Runs finished, by outcome.\n# TYPE backstop_runs_total counter"
        );
        for (k, v) in self.runs.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = writeln!(s, "backstop_runs_total{{outcome=\"{k}\"}} {v}");
        }
        let _ = writeln!(s, "# HELP backstop_run_failures_total Failed runs, by the phase that failed.\n# TYPE backstop_run_failures_total counter");
        for (k, v) in self.failures.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = writeln!(s, "backstop_run_failures_total{{reason=\"{k}\"}} {v}");
        }
        let _ = writeln!(s, "# HELP backstop_step_duration_seconds Time spent in run steps.\n# TYPE backstop_step_duration_seconds summary");
        for (k, (sum, count)) in self.steps.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = writeln!(s, "backstop_step_duration_seconds_sum{{step=\"{k}\"}} {sum}");
            let _ = writeln!(s, "backstop_step_duration_seconds_count{{step=\"{k}\"}} {count}");
        }
        let _ = writeln!(s, "# HELP backstop_refusals_total Commits the gate refused, by Kustomization.\n# TYPE backstop_refusals_total counter");
        for (k, v) in self.refusals.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = writeln!(s, "backstop_refusals_total{{kustomization=\"{k}\"}} {v}");
        }
        let reconciled = self.reconciled.lock().map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(s, "# HELP backstop_kustomizations_reconciled Guarded Kustomizations reconciled at least once by this process.\n# TYPE backstop_kustomizations_reconciled gauge\nbackstop_kustomizations_reconciled {reconciled}");
        let leader = self.leader.lock().map(|l| *l).unwrap_or(false);
        let _ = writeln!(s, "# HELP backstop_leader Whether this replica holds the lease.\n# TYPE backstop_leader gauge\nbackstop_leader {}", u8::from(leader));
        s
    }
}

/// Serves `/healthz` (alive), `/readyz` (started: client and endpoints up, leader or not) and `/metrics`.
pub async fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<tokio::task::JoinHandle<()>, OpsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Listen {
            addr: addr.into(),
            source,
        })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if metrics.is_ready() => ("200 OK", "ok\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", "not ready\n".to_string()),
                    "/metrics" => ("200 OK", metrics.render()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    }))
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
                        ..spec
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Some(0)),
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
