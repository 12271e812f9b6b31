//! Forges that host revert pull requests (GitHub, GitLab, Gitea/Forgejo). The
//! trait is what remediation drives; [`NoForge`] is `none`: the revert branch
//! is pushed and nothing is opened.

use async_trait::async_trait;

/// Failures talking to a forge.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("forge {forge} refused the request: {message}")]
    Refused { forge: String, message: String },
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
