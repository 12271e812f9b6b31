//! Controller benchmark (`KUBEBUILDER_ASSETS=... cargo bench --bench controller`):
//! on a real kube-apiserver, `BACKSTOP_BENCH_KUSTOMIZATIONS` (default 1000)
//! guarded Kustomizations over `BACKSTOP_BENCH_REPOS` (default 10)
//! GitRepositories, each its own repository served over smart HTTP:
//! 1. the first full pass (until every Kustomization was reconciled once),
//!    beside the anchor of listing them all once;
//! 2. steady state with nothing pending: CPU seconds per minute, RSS and
//!    peak RSS;
//! 3. push-to-run-start: a commit with a migration is pushed and the
//!    GitRepository's artifact moves to it (source-controller played); the
//!    time until the Kustomization's `MigrationRun` exists, p50/p99 over
//!    `BACKSTOP_BENCH_PUSHES` (default 20), beside the anchor of a plain
//!    watch seeing the same artifact change;
//! 4. the verified pause: time from kustomize-controller's status update
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

use backstop::k8s::crd::MigrationRun;
use backstop::k8s::pause::{self, KustomizationRef};
use backstop::sandbox::{BareRemote, Change};
use futures::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// User + system CPU seconds of `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

async fn metric(port: u16, name: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

fn artifact(sha: &str) -> serde_json::Value {
    json!({"status": {"artifact": {
        "revision": format!("backstop/gate@sha1:{sha}"),
        "digest": format!("sha256:{sha}"),
        "lastUpdateTime": "2026-01-01T00:00:00Z",
        "path": format!("gitrepository/{sha}.tar.gz"),
        "url": format!("http://source-controller/gitrepository/{sha}.tar.gz"),
    }}})
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
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
    let repos_n = env_num("BACKSTOP_BENCH_REPOS", 10).max(1);
    let pushes = env_num("BACKSTOP_BENCH_PUSHES", 20);
    let locks = env_num("BACKSTOP_BENCH_LOCKS", 200);
    let client = plane.client.clone();

    // Repositories with gate == main (nothing pending), served over smart
    // HTTP; app i lives in repository i % repos_n under apps/app-i.
    let dir = tempfile::tempdir()?;
    let mut remotes = Vec::new();
    for r in 0..repos_n {
        let remote = BareRemote::init(&dir.path().join(format!("sre{r}.git")))?;
        let files: Vec<(String, String)> = (0..n)
            .filter(|i| i % repos_n == r)
            .map(|i| {
                (
                    format!("apps/app-{i}/app.yaml"),
                    format!("kind: ConfigMap\nmetadata: {{name: app-{i}}}\n"),
                )
            })
            .collect();
        let changes: Vec<Change> = files.iter().map(|(p, c)| Change::Write(p, c)).collect();
        let base = remote.commit("main", &changes, "base")?;
        remote.set_branch("backstop/gate", &base)?;
        remotes.push(remote);
    }
    let git = http::git_server(dir.path().to_path_buf(), "flux", "pw").await;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        json!({"metadata": {"name": "git-auth"}, "stringData": {"username": "flux", "password": "pw"}}),
    )?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await?;
    let repos = backstop::k8s::controller::git_repositories(client.clone(), "default");
    for r in 0..repos_n {
        let repo: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
            "metadata": {"name": format!("sre{r}"), "namespace": "default"},
            "spec": {"interval": "1m", "url": format!("{}/sre{r}.git", git.url()), "ref": {"branch": "backstop/gate"}, "secretRef": {"name": "git-auth"}},
        }))?;
        repos.create(&PostParams::default(), &repo).await?;
    }
    let ks = pause::kustomizations(client.clone(), "default");
    let t = Instant::now();
    for i in 0..n {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": format!("app-{i}"), "namespace": "default",
                         "annotations": {"backstop.dev/guard": "enabled", "backstop.dev/upstream-branch": "main"}},
            "spec": {"interval": "5m", "path": format!("./apps/app-{i}"), "prune": true,
                     "sourceRef": {"kind": "GitRepository", "name": format!("sre{}", i % repos_n)}},
        }))?;
        ks.create(&PostParams::default(), &obj).await?;
    }
    println!(
        "created {n} guarded Kustomizations over {repos_n} GitRepositories in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let listed = ks.list(&ListParams::default()).await?.items.len();
    let list_anchor = t.elapsed().as_secs_f64();

    // Real databases for the migrations of step 3, one per repository (a
    // run starts only once its database answers and is claimed: pushes to
    // different apps' databases do not wait for each other's runs).
    let server = backstop::pgserver::PgServer::start().await?;
    for r in 0..repos_n {
        server.create_database(&format!("bench{r}")).await?;
    }

    // 1. The first full pass.
    let state = tempfile::tempdir()?;
    let log = std::fs::File::create(state.path().join("controller.log"))?;
    if std::env::var_os("BACKSTOP_BENCH_LOG").is_some() {
        println!("controller log: {}", state.path().join("controller.log").display());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let started = Instant::now();
    let mut controller = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args([
            "controller",
            "--interval",
            "30",
            "--timeout",
            "10",
            "--lease-namespace",
            "default",
            "--metrics-addr",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--kubeconfig")
        .arg(plane.kubeconfig_path())
        .arg("--state")
        .arg(state.path())
        .env(
            "BACKSTOP_LOG",
            std::env::var("BACKSTOP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs((0..repos_n).map(|r| (format!("BENCH_DATABASE_URL_{r}"), server.url(&format!("bench{r}")))))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = controller.id().ok_or("no pid")?;
    loop {
        if metric(port, "backstop_kustomizations_reconciled").await.unwrap_or(0.0) >= n as f64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("the first full pass took over 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pass = started.elapsed().as_secs_f64();
    println!(
        "first full pass: {pass:.1}s ({:.1} ms per Kustomization); anchor: one LIST of the {listed} Kustomizations {:.0} ms",
        pass * 1000.0 / n as f64,
        list_anchor * 1000.0
    );

    // 2. Steady state, nothing pending.
    let cpu0 = cpu_seconds(pid);
    let minute = Duration::from_secs(env_num("BACKSTOP_BENCH_STEADY_SECONDS", 60) as u64);
    tokio::time::sleep(minute).await;
    let cpu = (cpu_seconds(pid) - cpu0) * 60.0 / minute.as_secs_f64();
    println!(
        "steady state (interval 30s, nothing pending): {cpu:.1} CPU seconds per minute; RSS {:.1} MiB, peak {:.1} MiB",
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0
    );

    // kustomize-controller, played: it answers every reconcile request (the
    // pause handshake of each run, and of step 4), and a Kustomization that
    // is not suspended applies its gate and is Ready at it (the health gate
    // after a promotion).
    let answered: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let at = answered.clone();
    let api = ks.clone();
    let root = dir.path().to_path_buf();
    let fake = tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (changed, obj) = match event {
                watcher::Event::Apply(obj) => (true, obj),
                watcher::Event::InitApply(obj) => (false, obj),
                _ => continue,
            };
            if envtest::answer_reconcile_request(&api, &obj).await {
                *at.lock().unwrap() = Some(Instant::now());
            }
            // Applying happens on a change after startup (an unsuspend),
            // not for the initial listing of a thousand objects.
            if !changed || obj.data["spec"]["suspend"].as_bool() == Some(true) {
                continue;
            }
            let source = obj.data["spec"]["sourceRef"]["name"].as_str().unwrap_or_default();
            let Ok(out) = std::process::Command::new("git")
                .arg("--git-dir")
                .arg(root.join(format!("{source}.git")))
                .args(["rev-parse", "backstop/gate"])
                .output()
            else {
                continue;
            };
            let gate = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let applied = obj.data["status"]["lastAppliedRevision"].as_str().unwrap_or_default();
            if gate.is_empty() || applied.ends_with(&gate) {
                continue;
            }
            let status = json!({"status": {
                "lastAppliedRevision": format!("backstop/gate@sha1:{gate}"),
                "conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded",
                                "message": "Applied", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            }});
            let name = obj.metadata.name.clone().unwrap_or_default();
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        }
    });

    // 3. Push to run start, beside a plain watch seeing the artifact move.
    let seen: Arc<Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let seen_by_watch = seen.clone();
    let watch_repos = repos.clone();
    let anchor_watch = tokio::spawn(async move {
        let mut events = watcher(watch_repos, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            if let watcher::Event::Apply(obj) = event {
                if let Some(rev) = obj.data["status"]["artifact"]["revision"].as_str() {
                    seen_by_watch
                        .lock()
                        .unwrap()
                        .entry(rev.to_string())
                        .or_insert_with(Instant::now);
                }
            }
        }
    });
    let runs: Api<MigrationRun> = Api::namespaced(client.clone(), "default");
    let (mut to_run, mut to_watch) = (Vec::new(), Vec::new());
    let mut pushed_apps = std::collections::BTreeSet::new();
    for p in 0..pushes {
        let app = (p * 37) % n;
        pushed_apps.insert(app);
        let r = app % repos_n;
        let carrier = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: m-{p}\n  annotations:\n    backstop.dev/migration: \"{p:04}-bench\"\n    backstop.dev/database: url:BENCH_DATABASE_URL_{r}\n    backstop.dev/checkpoint: none\ndata:\n  up.sql: |\n    CREATE TABLE bench_{p} (id int);\n"
        );
        let path = format!("apps/app-{app}/migrations/{p:04}.yaml");
        let sha = remotes[r].commit("main", &[Change::Write(&path, &carrier)], "bench migration")?;
        let pushed = Instant::now();
        repos
            .patch_status(
                &format!("sre{r}"),
                &PatchParams::default(),
                &Patch::Merge(&artifact(&sha)),
            )
            .await?;
        let name = format!("app-{app}");
        let started = loop {
            let found = runs
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .any(|mr| mr.spec.kustomization == name && mr.spec.commit == sha);
            if found {
                break pushed.elapsed().as_secs_f64();
            }
            if pushed.elapsed() > Duration::from_secs(120) {
                println!("push {p}: no run started for {name} within 120s; stopping the pushes");
                break f64::INFINITY;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !started.is_finite() {
            break;
        }
        println!("push {p} ({name}): run started after {:.0} ms", started * 1000.0);
        to_run.push(started * 1000.0);
        if let Some(at) = seen.lock().unwrap().get(&format!("backstop/gate@sha1:{sha}")) {
            to_watch.push(at.saturating_duration_since(pushed).as_secs_f64() * 1000.0);
        }
    }
    anchor_watch.abort();
    to_run.sort_by(|a, b| a.total_cmp(b));
    to_watch.sort_by(|a, b| a.total_cmp(b));
    if !to_run.is_empty() && !to_watch.is_empty() {
        println!(
            "push to run start ({} pushes): p50 {:.0} ms, p99 {:.0} ms; anchor: a watch sees the artifact change p50 {:.0} ms, p99 {:.0} ms",
            to_run.len(),
            pct(&to_run, 0.5),
            pct(&to_run, 0.99),
            pct(&to_watch, 0.5),
            pct(&to_watch, 0.99)
        );
    }
    println!(
        "after the pushes: RSS {:.1} MiB, peak {:.1} MiB",
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    controller.kill().await.ok();
    if let Ok(to) = std::env::var("BACKSTOP_BENCH_KEEP_LOG") {
        std::fs::copy(state.path().join("controller.log"), &to)?;
        println!("controller log kept at {to}");
    }

    // 4. Handshake latency: status update -> pause taken.
    let mut latencies = Vec::with_capacity(locks);
    for i in 0..locks {
        // Kustomizations no push touched (a run may still hold those).
        let Some(app) = (0..n).map(|k| (i + k) % n).find(|a| !pushed_apps.contains(a)) else {
            break;
        };
        let target = KustomizationRef {
            namespace: "default".into(),
            name: format!("app-{app}"),
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
    println!(
        "pause handshake ({} locks): status update -> pause taken p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    Ok(())
}
