//! Credentials for the remote and URLs with credentials in them: split off,
//! kept apart, never shown.

use std::path::{Path, PathBuf};

/// Credentials for the remote. `Debug` never shows the secret.
#[derive(Clone, Default)]
pub enum GitAuth {
    /// Whatever the transport needs without credentials (paths, open servers).
    #[default]
    None,
    /// HTTPS: basic auth with a token as password (`x-access-token` for GitHub
    /// apps, `oauth2` for GitLab, any name for Gitea).
    Token { username: String, token: String },
    /// SSH with a deploy key; the server's host key must be in `known_hosts`.
    Ssh {
        username: String,
        key: PathBuf,
        known_hosts: PathBuf,
    },
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitAuth::None => f.write_str("GitAuth::None"),
            GitAuth::Token { username, .. } => write!(f, "GitAuth::Token({username}, <redacted>)"),
            GitAuth::Ssh { username, key, .. } => write!(f, "GitAuth::Ssh({username}, {})", key.display()),
        }
    }
}

impl GitAuth {
    /// Callbacks answering credential requests once (a refused credential is
    /// an error, not a loop) and checking SSH host keys against known_hosts.
    pub(super) fn callbacks(&self) -> git2::RemoteCallbacks<'static> {
        let mut callbacks = git2::RemoteCallbacks::new();
        let auth = self.clone();
        let mut asked = 0u32;
        callbacks.credentials(move |_url, username_from_url, allowed| {
            asked += 1;
            if asked > 1 {
                return Err(git2::Error::from_str(
                    "authentication failed: the remote refused the configured credentials",
                ));
            }
            match &auth {
                GitAuth::Token { username, token } if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) => {
                    git2::Cred::userpass_plaintext(username, token)
                }
                GitAuth::Ssh { username, key, .. } if allowed.contains(git2::CredentialType::SSH_KEY) => {
                    git2::Cred::ssh_key(username_from_url.unwrap_or(username), None, key, None)
                }
                GitAuth::Ssh { username, .. } if allowed.contains(git2::CredentialType::USERNAME) => {
                    git2::Cred::username(username_from_url.unwrap_or(username))
                }
                _ => Err(git2::Error::from_str(
                    "the remote asks for credentials and none are configured (--git-token-env or --ssh-key)",
                )),
            }
        });
        if let GitAuth::Ssh { known_hosts, .. } = self {
            let known_hosts = known_hosts.clone();
            callbacks.certificate_check(move |cert, host| {
                let Some(hostkey) = cert.as_hostkey().and_then(|h| h.hostkey()) else {
                    // Not SSH: TLS certificates are checked by the TLS library.
                    return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
                };
                if known_host(&known_hosts, host, hostkey) {
                    Ok(git2::CertificateCheckStatus::CertificateOk)
                } else {
                    // libgit2 replaces this error's text with its own; say it here.
                    tracing::warn!(host, known_hosts = %known_hosts.display(), "SSH host key is not in known_hosts; refusing to connect");
                    Err(git2::Error::from_str(&format!(
                        "the SSH host key of {host} is not in {}; refusing to connect",
                        known_hosts.display()
                    )))
                }
            });
        }
        callbacks
    }
}

/// Whether `known_hosts` lists `key` for `host` (plain host entries, with or
/// without `[host]:port`; hashed entries are not supported).
fn known_host(known_hosts: &Path, host: &str, key: &[u8]) -> bool {
    use base64::Engine;
    let Ok(text) = std::fs::read_to_string(known_hosts) else {
        return false;
    };
    text.lines().filter(|l| !l.trim_start().starts_with('#')).any(|line| {
        let mut parts = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let names_match = hosts.split(',').any(|h| {
            h == host
                || h.strip_prefix('[')
                    .and_then(|r| r.split_once("]:"))
                    .is_some_and(|(name, _)| name == host)
        });
        names_match
            && base64::engine::general_purpose::STANDARD
                .decode(b64)
                .is_ok_and(|k| k == key)
    })
}

/// Scheme, user information and the rest of a URL that has user information
/// (up to the last `@` before the path: passwords with a raw `@` happen).
fn userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// A URL without user information (`https://user:token@host` → `https://host`).
pub fn redact(url: &str) -> String {
    match userinfo(url) {
        Some((scheme, _, rest)) => format!("{scheme}://{rest}"),
        None => url.to_string(),
    }
}

/// An http(s) URL without its user information, and the user name and
/// password it carried (percent-decoded). Other schemes lose only a password:
/// SSH takes the user name from the URL.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, info, rest)) = userinfo(url) else {
        return (url.to_string(), None);
    };
    let (user, password) = info.split_once(':').unwrap_or((info, ""));
    if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
        let credentials = (!info.is_empty()).then(|| (percent_decode(user), percent_decode(password)));
        (format!("{scheme}://{rest}"), credentials)
    } else if info.contains(':') {
        (format!("{scheme}://{user}@{rest}"), None)
    } else {
        (url.to_string(), None)
    }
}

/// `%XX` escapes of URL user information decoded (invalid ones kept as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if bytes[i] == b'%' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_off_http_urls_only() {
        let split = |u: &str| split_credentials(u);
        let creds = |u: &str, p: &str| Some((u.to_string(), p.to_string()));
        assert_eq!(
            split("https://user:s3cr%40t@git.example/a/b.git"),
            ("https://git.example/a/b.git".into(), creds("user", "s3cr@t"))
        );
        assert_eq!(
            split("http://tok@h:8080/x"),
            ("http://h:8080/x".into(), creds("tok", ""))
        );
        assert_eq!(
            split("https://u:p@ss@h/x@y"),
            ("https://h/x@y".into(), creds("u", "p@ss"))
        );
        assert_eq!(split("https://h/x@y"), ("https://h/x@y".into(), None));
        assert_eq!(split("ssh://git:pw@h/x"), ("ssh://git@h/x".into(), None));
        assert_eq!(split("ssh://git@h/x"), ("ssh://git@h/x".into(), None));
        assert_eq!(split("git@h:x.git"), ("git@h:x.git".into(), None));
        assert_eq!(split("/srv/sre.git"), ("/srv/sre.git".into(), None));
        assert_eq!(redact("https://u:p@ss@h/x"), "https://h/x");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%+1%41"), "%+1A");
    }
}
