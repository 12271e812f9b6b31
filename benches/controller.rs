//! Controller benchmark (`KUBEBUILDER_ASSETS=... cargo bench --bench controller`):
//! on a real kube-apiserver,
//! 1. `BACKSTOP_BENCH_KUSTOMIZATIONS` (default 1000) guarded Kustomizations
//!    with nothing pending: the controller's RSS after its first full pass,
//!    and how long that pass took;
//! 2. the verified pause: time from kustomize-controller's status update
//!    (played here, answering at once) to `lock` returning, p50/p99 over
//!    `BACKSTOP_BENCH_LOCKS` (default 200) locks.
//!
//! Prints the figures; asserts nothing about them.

#[path = "../tests/common/envtest.rs"]
#[allow(dead_code)]
mod envtest;
#[path = "../tests/common/http.rs"]
#[allow(dead_code)]
mod http;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backstop::k8s::pause::{self, KustomizationRef};
use backstop::sandbox::{BareRemote, Change};
use futures::StreamExt;
use kube::api::{Api, DynamicObject, PostParams};
use kube::runtime::watcher;
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Res<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let Some(plane) = envtest::ControlPlane::start(&[]).await else {
        println!("skipped: KUBEBUILDER_ASSETS is not set");
        return Ok(());
    };
    let n = env_num("BACKSTOP_BENCH_KUSTOMIZATIONS", 1000);
    let locks = env_num("BACKSTOP_BENCH_LOCKS", 200);
    let client = plane.client.clone();

    // A git remote with gate == main (nothing pending), served over smart HTTP.
    let dir = tempfile::tempdir()?;
    let remote = BareRemote::init(&dir.path().join("sre.git"))?;
    let base = remote.commit(
        "main",
        &[Change::Write(
            "apps/shop/app.yaml",
            "kind: ConfigMap\nmetadata: {name: app}\n",
        )],
        "base",
    )?;
    remote.set_branch("backstop/gate", &base)?;
    let git = http::git_server(dir.path().to_path_buf(), "flux", "pw").await;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        json!({"metadata": {"name": "git-auth"}, "stringData": {"username": "flux", "password": "pw"}}),
    )?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await?;
    let gvk = kube::api::GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository");
    let repos: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &kube::api::ApiResource::from_gvk(&gvk));
    let repo: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "metadata": {"name": "sre", "namespace": "default"},
        "spec": {"interval": "1m", "url": format!("{}/sre.git", git.url()), "ref": {"branch": "backstop/gate"}, "secretRef": {"name": "git-auth"}},
    }))?;
    repos.create(&PostParams::default(), &repo).await?;
    let ks = pause::kustomizations(client.clone(), "default");
    let t = Instant::now();
    for i in 0..n {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": format!("app-{i}"), "namespace": "default",
                         "annotations": {"backstop.dev/guard": "enabled", "backstop.dev/upstream-branch": "main"}},
            "spec": {"interval": "5m", "path": "./apps/shop", "prune": true, "sourceRef": {"kind": "GitRepository", "name": "sre"}},
        }))?;
        ks.create(&PostParams::default(), &obj).await?;
    }
    println!(
        "created {n} guarded Kustomizations in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // 1. Controller RSS after its first full pass.
    let state = tempfile::tempdir()?;
    let log = std::fs::File::create(state.path().join("controller.log"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let started = Instant::now();
    let mut controller = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args([
            "controller",
            "--interval",
            "3600",
            "--lease-namespace",
            "default",
            "--metrics-addr",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--kubeconfig")
        .arg(plane.kubeconfig_path())
        .arg("--state")
        .arg(state.path())
        .env("BACKSTOP_LOG", "warn")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = controller.id().ok_or("no pid")?;
    // /readyz turns ok after the first full pass.
    loop {
        if reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pass = started.elapsed().as_secs_f64();
    let rss = rss_kib(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "controller with {n} guarded Kustomizations: first full pass {pass:.1}s ({:.1} ms each), RSS {:.1} MiB after it, {:.1} MiB 2s later",
        pass * 1000.0 / n as f64,
        rss as f64 / 1024.0,
        rss_kib(pid) as f64 / 1024.0
    );
    controller.kill().await.ok();

    // 2. Handshake latency: status update -> pause taken.
    let answered: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let at = answered.clone();
    let api = ks.clone();
    let fake = tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) = event else {
                continue;
            };
            if envtest::answer_reconcile_request(&api, &obj).await {
                *at.lock().unwrap() = Some(Instant::now());
            }
        }
    });
    let mut latencies = Vec::with_capacity(locks);
    for i in 0..locks {
        let target = KustomizationRef {
            namespace: "default".into(),
            name: format!("app-{}", i % n),
        };
        let owner = format!("bench-{i}");
        *answered.lock().unwrap() = None;
        pause::lock(client.clone(), &target, &owner, Duration::from_secs(30)).await?;
        let taken = Instant::now();
        if let Some(a) = *answered.lock().unwrap() {
            latencies.push(taken.saturating_duration_since(a).as_secs_f64() * 1000.0);
        }
        pause::unlock(client.clone(), &target, &owner).await?;
    }
    fake.abort();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "pause handshake ({} locks): status update -> pause taken p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    Ok(())
}
