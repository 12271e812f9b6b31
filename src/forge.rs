//! Forges that host revert pull requests: GitHub, GitLab and Gitea/Forgejo over
//! their REST APIs (base URL configurable for self-hosted instances), and
//! [`NoForge`] (`none`: the revert branch is pushed and nothing is opened).
//!
//! Opening is idempotent: when the forge says a pull request for the branch
//! already exists (GitHub 422, GitLab and Gitea 409/422), it is found and
//! updated instead. 5xx answers and network errors are retried with backoff;
//! 401/403 are configuration errors and are not. Tokens never appear in
//! errors, logs or reports.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

/// Failures talking to a forge.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("{forge} rejected the token ({status}): check that it is valid and may open pull requests on {repo}")]
    Auth {
        forge: &'static str,
        status: u16,
        repo: String,
    },
    #[error("{forge} answered {status} to {what}: {message}")]
    Refused {
        forge: &'static str,
        status: u16,
        what: &'static str,
        message: String,
    },
    #[error("{forge} could not be reached for {what} after {attempts} attempts: {message}")]
    Unavailable {
        forge: &'static str,
        what: &'static str,
        attempts: u32,
        message: String,
    },
    #[error("{forge} says a pull request for {head} exists, but it was not found")]
    NotFound { forge: &'static str, head: String },
    #[error("invalid forge configuration: {0}")]
    Config(String),
}

/// A pull request to open (or update) for a revert branch.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub title: String,
    pub body: String,
    /// Branch holding the revert.
    pub head: String,
    /// Branch to merge into (upstream).
    pub base: String,
    pub labels: Vec<String>,
    /// Where the full report is, for a body cut to the forge's limit.
    pub full_report: String,
}

/// A code-review host.
#[async_trait]
pub trait Forge: Send + Sync {
    /// Short name for records (`github`, `none`, ...).
    fn name(&self) -> &str;
    /// Opens the pull request, or updates the one already open for `head`.
    /// Returns its URL, or `None` when the forge opens nothing.
    async fn open_pull_request(&self, pr: &PullRequest) -> Result<Option<String>, ForgeError>;
}

/// No forge configured: the revert branch is the deliverable.
#[derive(Debug, Default, Clone)]
pub struct NoForge;

#[async_trait]
impl Forge for NoForge {
    fn name(&self) -> &str {
        "none"
    }

    async fn open_pull_request(&self, _pr: &PullRequest) -> Result<Option<String>, ForgeError> {
        Ok(None)
    }
}

/// Which REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ForgeKind {
    Github,
    Gitlab,
    Gitea,
    None,
}

/// Retries of 5xx and network errors: `attempts` tries, doubling `delay`.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 5,
            delay: Duration::from_secs(1),
        }
    }
}

/// A REST forge.
#[derive(Clone)]
pub struct RestForge {
    kind: ForgeKind,
    base: String,
    /// `owner/name` (GitHub, Gitea) or the project path (GitLab).
    repo: String,
    token: String,
    http: reqwest::Client,
    retry: Retry,
}

impl std::fmt::Debug for RestForge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RestForge({:?} {} {})", self.kind, self.base, self.repo)
    }
}

/// The longest body each forge accepts (characters), with room for the note.
fn body_limit(kind: ForgeKind) -> usize {
    match kind {
        ForgeKind::Github => 65_000,
        ForgeKind::Gitea => 65_000,
        ForgeKind::Gitlab => 1_000_000,
        ForgeKind::None => usize::MAX,
    }
}

/// The body cut to `limit` characters, ending with a pointer to the full report.
pub fn cut_body(body: &str, limit: usize, full_report: &str) -> String {
    if body.chars().count() <= limit {
        return body.to_string();
    }
    let note = format!("\n\n… (report cut to fit; the full report is {full_report})\n");
    let keep = limit.saturating_sub(note.chars().count());
    let mut out: String = body.chars().take(keep).collect();
    out.push_str(&note);
    out
}

impl RestForge {
    /// A forge client. `base` is the API root's host, e.g. `https://api.github.com`,
    /// `https://gitlab.example.com`, `https://gitea.example.com`.
    pub fn new(kind: ForgeKind, base: &str, repo: &str, token: &str, retry: Retry) -> Result<Self, ForgeError> {
        if kind == ForgeKind::None {
            return Err(ForgeError::Config("use NoForge for `none`".into()));
        }
        if token.is_empty() {
            return Err(ForgeError::Config("the forge token is empty".into()));
        }
        if kind != ForgeKind::Gitlab && repo.split('/').count() != 2 {
            return Err(ForgeError::Config(format!("repository {repo:?} must read owner/name")));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("backstop/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ForgeError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            kind,
            base: base.trim_end_matches('/').to_string(),
            repo: repo.to_string(),
            token: token.to_string(),
            http,
            retry,
        })
    }

    fn forge(&self) -> &'static str {
        match self.kind {
            ForgeKind::Github => "GitHub",
            ForgeKind::Gitlab => "GitLab",
            ForgeKind::Gitea => "Gitea",
            ForgeKind::None => "none",
        }
    }

    fn url(&self, path: &str) -> String {
        match self.kind {
            ForgeKind::Github => format!("{}/repos/{}{path}", self.base, self.repo),
            ForgeKind::Gitea => format!("{}/api/v1/repos/{}{path}", self.base, self.repo),
            ForgeKind::Gitlab => format!("{}/api/v4/projects/{}{path}", self.base, self.repo.replace('/', "%2F")),
            ForgeKind::None => String::new(),
        }
    }

    fn authorize(&self, req: RequestBuilder) -> RequestBuilder {
        match self.kind {
            ForgeKind::Github => req
                .bearer_auth(&self.token)
                .header("Accept", "application/vnd.github+json"),
            ForgeKind::Gitlab => req.header("PRIVATE-TOKEN", &self.token),
            ForgeKind::Gitea => req.header("Authorization", format!("token {}", self.token)),
            ForgeKind::None => req,
        }
    }

    /// Sends with retries; returns (status, JSON body).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &'static str,
    ) -> Result<(StatusCode, Value), ForgeError> {
        let mut delay = self.retry.delay;
        let mut last = String::new();
        for attempt in 1..=self.retry.attempts.max(1) {
            let mut req = self.authorize(self.http.request(method.clone(), self.url(path)));
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let value: Value = resp.json().await.unwrap_or(Value::Null);
                    if status.is_server_error() {
                        last = format!("{status}");
                    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        return Err(ForgeError::Auth {
                            forge: self.forge(),
                            status: status.as_u16(),
                            repo: self.repo.clone(),
                        });
                    } else {
                        return Ok((status, value));
                    }
                }
                // reqwest errors carry the URL, never the headers with the token.
                Err(e) => last = e.without_url().to_string(),
            }
            if attempt < self.retry.attempts {
                tracing::warn!(forge = self.forge(), what, attempt, error = %last, "forge request failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
        }
        Err(ForgeError::Unavailable {
            forge: self.forge(),
            what,
            attempts: self.retry.attempts,
            message: last,
        })
    }

    fn refused(&self, status: StatusCode, what: &'static str, body: &Value) -> ForgeError {
        let message = body
            .get("message")
            .map(|m| m.to_string())
            .or_else(|| body.get("errors").map(|e| e.to_string()))
            .unwrap_or_default();
        ForgeError::Refused {
            forge: self.forge(),
            status: status.as_u16(),
            what,
            message,
        }
    }

    /// The open pull request for `head`: (number, URL).
    async fn find(&self, pr: &PullRequest) -> Result<Option<(u64, String)>, ForgeError> {
        let owner = self.repo.split('/').next().unwrap_or("");
        let path = match self.kind {
            ForgeKind::Github => format!("/pulls?state=open&head={owner}:{}", pr.head),
            ForgeKind::Gitlab => format!("/merge_requests?state=opened&source_branch={}", pr.head),
            _ => "/pulls?state=open&limit=50".to_string(),
        };
        let (status, list) = self
            .send(Method::GET, &path, None, "finding the existing pull request")
            .await?;
        if !status.is_success() {
            return Err(self.refused(status, "finding the existing pull request", &list));
        }
        let found = list.as_array().into_iter().flatten().find(|p| match self.kind {
            ForgeKind::Gitlab => p["source_branch"] == pr.head.as_str(),
            _ => p["head"]["ref"] == pr.head.as_str(),
        });
        Ok(found.map(|p| self.identity(p)))
    }

    fn identity(&self, p: &Value) -> (u64, String) {
        match self.kind {
            ForgeKind::Gitlab => (
                p["iid"].as_u64().unwrap_or(0),
                p["web_url"].as_str().unwrap_or("").to_string(),
            ),
            _ => (
                p["number"].as_u64().unwrap_or(0),
                p["html_url"].as_str().unwrap_or("").to_string(),
            ),
        }
    }

    async fn update(&self, number: u64, pr: &PullRequest, body: &str) -> Result<(), ForgeError> {
        let (method, path, payload) = match self.kind {
            ForgeKind::Gitlab => (
                Method::PUT,
                format!("/merge_requests/{number}"),
                json!({"title": pr.title, "description": body}),
            ),
            _ => (
                Method::PATCH,
                format!("/pulls/{number}"),
                json!({"title": pr.title, "body": body}),
            ),
        };
        let (status, v) = self
            .send(method, &path, Some(&payload), "updating the pull request")
            .await?;
        if !status.is_success() {
            return Err(self.refused(status, "updating the pull request", &v));
        }
        Ok(())
    }

    async fn label(&self, number: u64, labels: &[String]) -> Result<(), ForgeError> {
        if labels.is_empty() {
            return Ok(());
        }
        let (status, v) = match self.kind {
            // GitLab takes labels on creation.
            ForgeKind::Gitlab => return Ok(()),
            ForgeKind::Github => {
                self.send(
                    Method::POST,
                    &format!("/issues/{number}/labels"),
                    Some(&json!({ "labels": labels })),
                    "labelling the pull request",
                )
                .await?
            }
            _ => {
                // Gitea labels by id: look the names up, skip the ones that do not exist.
                let (_, all) = self
                    .send(Method::GET, "/labels?limit=50", None, "listing labels")
                    .await?;
                let ids: Vec<u64> = all
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|l| labels.iter().any(|n| l["name"] == n.as_str()))
                    .filter_map(|l| l["id"].as_u64())
                    .collect();
                if ids.is_empty() {
                    return Ok(());
                }
                self.send(
                    Method::POST,
                    &format!("/issues/{number}/labels"),
                    Some(&json!({ "labels": ids })),
                    "labelling the pull request",
                )
                .await?
            }
        };
        if !status.is_success() {
            tracing::warn!(error = %self.refused(status, "labelling the pull request", &v), "pull request left unlabelled");
        }
        Ok(())
    }
}

#[async_trait]
impl Forge for RestForge {
    fn name(&self) -> &str {
        match self.kind {
            ForgeKind::Github => "github",
            ForgeKind::Gitlab => "gitlab",
            ForgeKind::Gitea => "gitea",
            ForgeKind::None => "none",
        }
    }

    async fn open_pull_request(&self, pr: &PullRequest) -> Result<Option<String>, ForgeError> {
        let body = cut_body(&pr.body, body_limit(self.kind), &pr.full_report);
        let payload = match self.kind {
            ForgeKind::Gitlab => json!({
                "source_branch": pr.head, "target_branch": pr.base, "title": pr.title,
                "description": body, "labels": pr.labels.join(","), "remove_source_branch": true,
            }),
            _ => json!({"title": pr.title, "head": pr.head, "base": pr.base, "body": body}),
        };
        let path = if self.kind == ForgeKind::Gitlab {
            "/merge_requests"
        } else {
            "/pulls"
        };
        let (status, created) = self
            .send(Method::POST, path, Some(&payload), "opening the pull request")
            .await?;
        let (number, url) = if status.is_success() {
            self.identity(&created)
        } else if status == StatusCode::CONFLICT || status == StatusCode::UNPROCESSABLE_ENTITY {
            // Already open for this branch: reuse it, with the current report.
            let Some((number, url)) = self.find(pr).await? else {
                if status == StatusCode::UNPROCESSABLE_ENTITY && !created.to_string().contains("already exist") {
                    return Err(self.refused(status, "opening the pull request", &created));
                }
                return Err(ForgeError::NotFound {
                    forge: self.forge(),
                    head: pr.head.clone(),
                });
            };
            self.update(number, pr, &body).await?;
            (number, url)
        } else {
            return Err(self.refused(status, "opening the pull request", &created));
        };
        self.label(number, &pr.labels).await?;
        Ok(Some(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_bodies_are_cut_with_a_pointer_to_the_full_report() {
        let body = "x".repeat(100);
        let cut = cut_body(&body, 80, "runs/r1/report.md");
        assert!(cut.chars().count() <= 80);
        assert!(cut.ends_with("the full report is runs/r1/report.md)\n"));
        assert_eq!(cut_body("short", 80, "x"), "short");
    }

    #[test]
    fn debug_does_not_show_the_token() {
        let f = RestForge::new(ForgeKind::Github, "http://x", "o/r", "sekrit-token", Retry::default()).unwrap();
        assert!(!format!("{f:?}").contains("sekrit"));
    }
}
