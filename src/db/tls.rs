//! TLS to PostgreSQL with libpq's `sslmode` meaning: `disable`, `prefer`
//! and `require` (encrypted, certificate not checked), `verify-ca` (the
//! server's certificate chains to `sslrootcert`, or the system roots when
//! none is named), `verify-full` (and names the host connected to).
//! tokio-postgres knows only the first three and no `sslrootcert`, so both
//! are taken out of the connection string here before it is parsed.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::{TlsConnector, TlsStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// libpq's default: TLS when the server offers it, unchecked.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        Ok(match value {
            "disable" => Self::Disable,
            // `allow` tries without TLS first; backstop treats it as prefer.
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    /// The value libpq tools get in `PGSSLMODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres negotiates (verification is the connector's).
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            Self::Disable => tokio_postgres::config::SslMode::Disable,
            Self::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// The TLS part of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// Splits `sslmode` and `sslrootcert` out of a libpq URL
/// (`postgresql://…?sslmode=verify-full&sslrootcert=/ca.crt`) or key=value
/// string; returns the rest, which tokio-postgres parses.
pub fn split(conninfo: &str) -> Result<(String, Tls), String> {
    let mut tls = Tls::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => tls.mode = SslMode::parse(value)?,
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let Some((base, query)) = conninfo.split_once('?') else {
            return Ok((conninfo.to_string(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(v);
            if !take(k, &value)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, tls));
    }
    // key=value: values may be quoted ('…', with \' and \\ escapes).
    let mut kept = Vec::new();
    let mut rest = conninfo.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or("a key=value connection string needs `=` after every key")?;
        let key = key.trim();
        let after = after.trim_start();
        let (value, raw_len) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        end = Some(i + 2);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, end.ok_or("unterminated quoted value in the connection string")?)
        } else {
            let len = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..len].to_string(), len)
        };
        if !take(key, &value)? {
            kept.push(format!("{key}={}", &after[..raw_len]));
        }
        rest = after[raw_len..].trim_start();
    }
    Ok((kept.join(" "), tls))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            ) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connector for `tls` (None for `disable`). OpenSSL's context is
/// built only when a server accepts TLS, and then once per process and
/// settings: building it reads the system's CA bundle (about 30 ms here),
/// which a server without TLS (`prefer`) never needs.
pub fn connector(tls: &Tls) -> Option<LazyTls> {
    (tls.mode != SslMode::Disable).then(|| LazyTls { tls: tls.clone() })
}

/// Makes [`LazyTlsConnect`]s (tokio-postgres' `MakeTlsConnect`).
#[derive(Debug, Clone)]
pub struct LazyTls {
    tls: Tls,
}

impl<S> MakeTlsConnect<S> for LazyTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = LazyTlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<LazyTlsConnect, Self::Error> {
        Ok(LazyTlsConnect {
            tls: self.tls.clone(),
            domain: domain.to_string(),
        })
    }
}

/// One TLS handshake; the OpenSSL context is taken (or built) only here.
#[derive(Debug)]
pub struct LazyTlsConnect {
    tls: Tls,
    domain: String,
}

impl<S> TlsConnect<S> for LazyTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let configured = shared(&self.tls).and_then(|connector| {
            let mut config = connector.configure()?;
            config.set_verify_hostname(self.tls.mode == SslMode::VerifyFull);
            Ok(config)
        });
        match configured {
            Ok(config) => TlsConnector::new(config, &self.domain).connect(stream),
            Err(e) => Box::pin(std::future::ready(Err(Box::new(e) as Self::Error))),
        }
    }
}

/// The OpenSSL connector for `tls`, built once per process and settings.
fn shared(tls: &Tls) -> Result<SslConnector, openssl::error::ErrorStack> {
    static BUILT: std::sync::Mutex<Vec<(Tls, SslConnector)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, connector)) = built.iter().find(|(t, _)| t == tls) {
        return Ok(connector.clone());
    }
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    match tls.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            builder.set_verify(SslVerifyMode::PEER);
            match &tls.root_cert {
                Some(path) => builder.set_ca_file(path)?,
                None => builder.set_default_verify_paths()?,
            }
        }
        _ => builder.set_verify(SslVerifyMode::NONE),
    }
    let connector = builder.build();
    built.push((tls.clone(), connector.clone()));
    Ok(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_rootcert_leave_urls_and_keyword_strings() {
        let (rest, tls) =
            split("postgresql://app@db:5432/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.crt&application_name=x")
                .unwrap();
        assert_eq!(rest, "postgresql://app@db:5432/shop?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some(std::path::Path::new("/etc/ca.crt")));
        let (rest, tls) =
            split("host=db user=app password='s3\\'cret' sslmode=verify-ca sslrootcert='/a b/ca.crt'").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some(std::path::Path::new("/a b/ca.crt")));
        assert_eq!(rest, "host=db user=app password='s3\\'cret'");
        let (rest, tls) = split("postgresql://app@db/shop").unwrap();
        assert_eq!((rest.as_str(), tls.mode), ("postgresql://app@db/shop", SslMode::Prefer));
    }

    #[test]
    fn percent_escapes_next_to_multibyte_characters_do_not_panic() {
        let (_, tls) = split("postgresql://db/x?sslrootcert=%a\u{e9}%2F%zz").unwrap();
        assert_eq!(tls.root_cert.unwrap().display().to_string(), "%a\u{e9}/%zz");
    }

    #[test]
    fn an_unknown_sslmode_is_named() {
        let e = split("postgresql://db/x?sslmode=sometimes").unwrap_err();
        assert!(e.contains("\"sometimes\""), "{e}");
    }
}
