//! Revert pull requests against local HTTP servers standing in for GitHub,
//! GitLab and Gitea (each checks method, path, auth header and body), the
//! retry and pending behaviour end to end, and authenticated git over HTTP.

mod common;

use std::time::Duration;

use backstop::forge::{Forge, ForgeError, ForgeKind, PullRequest, RestForge, Retry};
use common::http::{Request, Response, Server};
use common::*;
use serde_json::json;

const TOKEN: &str = "sekrit-token-0123456789";

fn pr() -> PullRequest {
    PullRequest {
        title: "Revert \"add column\"".into(),
        body: "# backstop run r1\n\n**Outcome: RolledBack**".into(),
        head: "backstop/revert-abc1234".into(),
        base: "main".into(),
        labels: vec!["backstop".into(), "revert".into()],
        full_report: "runs/r1/report.md".into(),
    }
}

fn fast() -> Retry {
    Retry {
        attempts: 3,
        delay: Duration::from_millis(20),
    }
}

fn forge(kind: ForgeKind, server: &Server) -> RestForge {
    RestForge::new(kind, &server.url(), "platform/sre", TOKEN, fast()).unwrap()
}

/// What each forge's API looks like.
struct Api {
    kind: ForgeKind,
    create: &'static str,
    auth: (&'static str, String),
    exists_status: u16,
    list: &'static str,
    update: (&'static str, &'static str),
    created: serde_json::Value,
}

fn apis() -> Vec<Api> {
    vec![
        Api {
            kind: ForgeKind::Github,
            create: "/repos/platform/sre/pulls",
            auth: ("Authorization", format!("Bearer {TOKEN}")),
            exists_status: 422,
            list: "/repos/platform/sre/pulls?state=open&head=platform:backstop/revert-abc1234",
            update: ("PATCH", "/repos/platform/sre/pulls/7"),
            created: json!({"number": 7, "html_url": "https://github.example/platform/sre/pull/7", "head": {"ref": "backstop/revert-abc1234"}}),
        },
        Api {
            kind: ForgeKind::Gitlab,
            create: "/api/v4/projects/platform%2Fsre/merge_requests",
            auth: ("PRIVATE-TOKEN", TOKEN.to_string()),
            exists_status: 409,
            list: "/api/v4/projects/platform%2Fsre/merge_requests?state=opened&source_branch=backstop/revert-abc1234",
            update: ("PUT", "/api/v4/projects/platform%2Fsre/merge_requests/7"),
            created: json!({"iid": 7, "web_url": "https://gitlab.example/platform/sre/-/merge_requests/7", "source_branch": "backstop/revert-abc1234"}),
        },
        Api {
            kind: ForgeKind::Gitea,
            create: "/api/v1/repos/platform/sre/pulls",
            auth: ("Authorization", format!("token {TOKEN}")),
            exists_status: 409,
            list: "/api/v1/repos/platform/sre/pulls?state=open&limit=50",
            update: ("PATCH", "/api/v1/repos/platform/sre/pulls/7"),
            created: json!({"number": 7, "html_url": "https://gitea.example/platform/sre/pulls/7", "head": {"ref": "backstop/revert-abc1234"}}),
        },
    ]
}

fn url_of(api: &Api) -> String {
    api.created
        .get("html_url")
        .or(api.created.get("web_url"))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn check_auth(api: &Api, r: &Request) {
    assert_eq!(
        r.header(api.auth.0),
        Some(api.auth.1.as_str()),
        "{:?} auth header on {} {}",
        api.kind,
        r.method,
        r.path
    );
}

#[tokio::test]
async fn opens_a_pull_request_on_each_forge() {
    for api in apis() {
        let created = api.created.clone();
        let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
            ("POST", p) if p.ends_with("/pulls") || p.ends_with("/merge_requests") => {
                Response::json(201, created.clone())
            }
            _ => Response::json(200, json!([])),
        })
        .await;
        let url = forge(api.kind, &server).open_pull_request(&pr()).await.unwrap();
        assert_eq!(url.as_deref(), Some(url_of(&api).as_str()), "{:?}", api.kind);
        let reqs = server.requests();
        let create = &reqs[0];
        assert_eq!((create.method.as_str(), create.path.as_str()), ("POST", api.create));
        check_auth(&api, create);
        let body = create.json();
        assert_eq!(body["title"], "Revert \"add column\"");
        match api.kind {
            ForgeKind::Gitlab => {
                assert_eq!(body["source_branch"], "backstop/revert-abc1234");
                assert_eq!(body["target_branch"], "main");
                assert!(body["description"].as_str().unwrap().contains("RolledBack"));
                assert_eq!(body["labels"], "backstop,revert");
            }
            _ => {
                assert_eq!(body["head"], "backstop/revert-abc1234");
                assert_eq!(body["base"], "main");
                assert!(body["body"].as_str().unwrap().contains("RolledBack"));
            }
        }
        if api.kind == ForgeKind::Github {
            assert_eq!(reqs[1].path, "/repos/platform/sre/issues/7/labels");
            assert_eq!(reqs[1].json()["labels"], json!(["backstop", "revert"]));
        }
    }
}

#[tokio::test]
async fn an_existing_pull_request_is_found_and_updated_not_duplicated() {
    for api in apis() {
        let (created, exists, update) = (api.created.clone(), api.exists_status, api.update);
        let server = Server::start(move |r| match r.method.as_str() {
            "POST" if r.path.ends_with("/pulls") || r.path.ends_with("/merge_requests") => Response::json(
                exists,
                json!({"message": "A pull request already exists for platform:backstop/revert-abc1234."}),
            ),
            "GET" if r.path.contains("/labels") => Response::json(200, json!([{"id": 3, "name": "revert"}])),
            "GET" => Response::json(200, json!([created.clone()])),
            m if m == update.0 => Response::json(200, created.clone()),
            _ => Response::json(200, json!({})),
        })
        .await;
        let url = forge(api.kind, &server).open_pull_request(&pr()).await.unwrap();
        assert_eq!(url.as_deref(), Some(url_of(&api).as_str()), "{:?}", api.kind);
        let reqs = server.requests();
        assert_eq!(
            reqs.iter()
                .filter(|r| r.method == "POST" && r.path == api.create)
                .count(),
            1,
            "{:?}",
            api.kind
        );
        assert_eq!(reqs[1].path, api.list, "{:?}", api.kind);
        let upd = reqs
            .iter()
            .find(|r| r.method == api.update.0)
            .unwrap_or_else(|| panic!("{:?}: no update", api.kind));
        assert_eq!(upd.path, api.update.1);
        check_auth(&api, upd);
        let body = upd.json();
        assert!(body
            .get("body")
            .or(body.get("description"))
            .unwrap()
            .as_str()
            .unwrap()
            .contains("RolledBack"));
    }
}

#[tokio::test]
async fn rejected_token_is_a_plain_configuration_error_without_retries() {
    for api in apis() {
        let server = Server::start(|_| Response::json(401, json!({"message": "Bad credentials"}))).await;
        let err = forge(api.kind, &server).open_pull_request(&pr()).await.unwrap_err();
        assert!(matches!(err, ForgeError::Auth { status: 401, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("rejected the token (401)") && text.contains("platform/sre"),
            "{text}"
        );
        assert!(!text.contains(TOKEN));
        assert_eq!(server.requests().len(), 1, "no retry on 401");
    }
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    for api in apis() {
        let created = api.created.clone();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let server = Server::start(move |r| {
            if r.method == "POST" && (r.path.ends_with("/pulls") || r.path.ends_with("/merge_requests")) {
                if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    return Response::json(502, json!({"message": "bad gateway"}));
                }
                return Response::json(201, created.clone());
            }
            Response::json(200, json!([]))
        })
        .await;
        let url = forge(api.kind, &server).open_pull_request(&pr()).await.unwrap();
        assert_eq!(url.as_deref(), Some(url_of(&api).as_str()));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3, "{:?}", api.kind);
    }
    // Always failing: gives up after the attempts, saying so.
    let server = Server::start(|_| Response::json(503, json!({}))).await;
    let err = forge(ForgeKind::Github, &server)
        .open_pull_request(&pr())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("could not be reached for opening the pull request after 3 attempts"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 3);
}

fn failing() -> CarrierBuilder {
    carrier("0002-broken").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;\nINSERT INTO nowhere VALUES (1);",
    )
}

#[tokio::test]
async fn forge_down_then_up_records_pending_and_a_later_pass_opens_it_without_leaking_the_token() {
    let (f, c1) = with_orders().await;
    let c2 = f.commit_carrier(&failing(), "add note");
    // A port with nothing listening: the forge is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let flags = [
        "--forge",
        "github",
        "--forge-url",
        &format!("http://127.0.0.1:{port}"),
        "--forge-repo",
        "platform/sre",
        "--forge-retries",
        "2",
        "--forge-retry-delay-ms",
        "20",
    ];
    let env = [("BACKSTOP_FORGE_TOKEN", TOKEN), ("BACKSTOP_LOG", "debug")];
    let out = f.run_env(&flags, &env).await;
    let first = text(&out);
    assert_eq!(out.status.code(), Some(1), "{first}");
    assert_eq!(f.gate(), c1);
    let branch = format!("backstop/revert-{}", &c2[..7]);
    assert!(
        f.remote.head(&branch).unwrap().is_some(),
        "the revert branch is pushed before the forge is asked"
    );
    let report = f.reports().pop().unwrap();
    assert_eq!(report["revert"]["pr_pending"], true, "{report}");
    assert!(
        report["revert"]["note"]
            .as_str()
            .unwrap()
            .contains("revert pushed, pull request pending"),
        "{report}"
    );

    let server = Server::start_on(port, |r| {
        if r.method == "POST" && r.path == "/repos/platform/sre/pulls" {
            return Response::json(
                201,
                json!({"number": 9, "html_url": "https://github.example/platform/sre/pull/9"}),
            );
        }
        Response::json(200, json!([]))
    })
    .await;
    let out = f.run_env(&flags, &env).await;
    let second = text(&out);
    assert_eq!(out.status.code(), Some(0), "{second}");
    let created = server
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/pulls"))
        .expect("pull request opened");
    assert_eq!(created.json()["head"], branch.as_str());
    assert!(created.json()["body"]
        .as_str()
        .unwrap()
        .contains("**Outcome: RolledBack**"));
    let report = f.reports().pop().unwrap();
    assert_eq!(
        report["revert"]["pull_request"], "https://github.example/platform/sre/pull/9",
        "{report}"
    );
    assert_eq!(report["revert"]["pr_pending"], false);
    // The next pass does not open it again.
    f.run_env(&flags, &env).await;
    let opened = server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/pulls"))
        .count();
    assert_eq!(opened, 1, "opened once");

    // The token is in no log line, journal entry or report.
    for output in [&first, &second] {
        assert!(!output.contains(TOKEN), "token in the logs");
    }
    let mut stack = vec![f.state()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                assert!(!text.contains(TOKEN), "token in {}", p.display());
            }
        }
    }
}

#[tokio::test]
async fn push_over_http_with_a_token_and_refusal_with_a_wrong_one() {
    let f = Fixture::new().await;
    let root = f.remote.path().parent().unwrap().to_path_buf();
    let server = common::http::git_server(root, "x-access-token", TOKEN).await;
    let url = format!("{}/sre.git", server.url());
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let flags = ["--git-token-env", "GIT_TOKEN"];
    let refused = f.run_url(&url, &flags, &[("GIT_TOKEN", "wrong-token")]).await;
    let text_refused = text(&refused);
    assert_eq!(refused.status.code(), Some(2), "{text_refused}");
    assert!(text_refused.contains("authentication failed"), "{text_refused}");
    assert!(!text_refused.contains("wrong-token"));
    assert_eq!(f.gate(), f.base, "nothing pushed with a wrong token");
    let ok = f.run_url(&url, &flags, &[("GIT_TOKEN", TOKEN)]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert_eq!(f.gate(), c1, "gate pushed over smart HTTP with basic auth");
    assert!(!text(&ok).contains(TOKEN));
    assert!(server
        .requests()
        .iter()
        .any(|r| r.path.ends_with("/git-receive-pack") && r.method == "POST"));
}

/// A TLS front (socat) for a plain HTTP server, with a self-signed certificate
/// for 127.0.0.1 that the client is told to trust through SSL_CERT_FILE.
struct TlsFront {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_front(backend_port: u16) -> TlsFront {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("socat")
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            cert.display(),
            key.display()
        ))
        .arg(format!("TCP:127.0.0.1:{backend_port}"))
        .spawn()
        .expect("socat (apt-get install socat)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsFront {
        child,
        port,
        ca: cert,
        _dir: dir,
    }
}

#[tokio::test]
async fn push_over_https_with_a_token_and_refusal_with_a_wrong_one() {
    let f = Fixture::new().await;
    let root = f.remote.path().parent().unwrap().to_path_buf();
    let server = common::http::git_server(root, "x-access-token", TOKEN).await;
    let tls = tls_front(server.port);
    let url = format!("https://127.0.0.1:{}/sre.git", tls.port);
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let flags = ["--git-token-env", "GIT_TOKEN"];
    let ca = tls.ca.to_str().unwrap();
    let refused = f
        .run_url(&url, &flags, &[("GIT_TOKEN", "wrong-token"), ("SSL_CERT_FILE", ca)])
        .await;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("authentication failed"), "{}", text(&refused));
    assert_eq!(f.gate(), f.base);
    let ok = f
        .run_url(&url, &flags, &[("GIT_TOKEN", TOKEN), ("SSL_CERT_FILE", ca)])
        .await;
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert_eq!(f.gate(), c1, "gate pushed over HTTPS with basic auth");
    assert!(!text(&ok).contains(TOKEN) && !text(&refused).contains("wrong-token"));
}
