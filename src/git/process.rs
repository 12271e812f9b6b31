//! libgit2's process-wide settings: bounded network waits, no second
//! hashing of every object read, and its CA bundle loaded only when an
//! https remote needs it.

use std::path::PathBuf;
use std::sync::{Once, OnceLock};

/// How long a git server may take to accept a connection.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a git server may stay silent in the middle of a fetch or push.
pub const SERVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Bounds every git network operation of this process: libgit2 waits
/// forever on a server that stops answering, and a fetch or push that
/// hangs holds its mirror (every Kustomization on that repository) with
/// it. A timed-out fetch or push is a transient failure, retried with
/// backoff like any other. Called once at startup, before any git
/// operation (libgit2's options are process-wide). Also turns off
/// libgit2's second hashing of every object it reads.
pub fn bound_network_waits() {
    static ONCE: Once = Once::new();
    ONCE.call_once(set_network_timeouts);
}

fn set_network_timeouts() {
    let ms = |d: std::time::Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: libgit2's global options are set once, at startup, before
    // any git operation of this process.
    unsafe {
        if let Err(e) = git2::opts::set_server_connect_timeout_in_milliseconds(ms(CONNECT_TIMEOUT)) {
            tracing::warn!(error = %e, "cannot bound git connection waits");
        }
        if let Err(e) = git2::opts::set_server_timeout_in_milliseconds(ms(SERVER_TIMEOUT)) {
            tracing::warn!(error = %e, "cannot bound git server waits");
        }
    }
    // libgit2 hashes every object again each time it reads one (git does
    // not): a third of a detection pass. The mirror's objects were checked
    // when they arrived (index-pack verifies every object of a fetched pack).
    git2::opts::strict_hash_verification(false);
}

/// The CA bundle libgit2 was started without (None: nothing was deferred,
/// or the system has no bundle).
static DEFERRED: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Starts libgit2 without reading OpenSSL's CA bundle: libgit2 parses the
/// whole bundle when it starts (about 20 ms, a fifth of a pass that runs
/// nothing), though only a remote over the network needs it;
/// [`load_ca_bundle`] loads it before libgit2's first fetch or push. The process environment
/// ends as git2 would have left it (`SSL_CERT_FILE` the bundle it probes
/// for, unless one was set), so every other TLS user is unchanged.
///
/// libgit2 and OpenSSL start on a thread of their own (about 1.5 ms here:
/// OpenSSL's configuration and context) while the process goes on with its
/// own start (logging, the command line). Call first thing in `main`,
/// before any other thread exists, and [`CaBundleDeferral::finish`] before
/// any other thread is made. Meanwhile the helper changes the environment
/// (git2 sets OpenSSL's certificate variables through `std::env`): the
/// caller may read it only through `std::env`, whose lock orders both,
/// never through C's `getenv` (a local-time clock reads `TZ` that way).
pub fn start_deferring_ca_bundle() -> CaBundleDeferral {
    // What git2 would have set: the variable when it names a file, else
    // the bundle found in the usual places.
    let bundle = openssl_probe::probe().cert_file;
    // An existing, empty file: git2's probe keeps it, and OpenSSL loads
    // nothing from it (the hashed certificate folder is still looked at,
    // lazily, per certificate).
    std::env::set_var("SSL_CERT_FILE", "/dev/null");
    // Any option starts libgit2 (and OpenSSL's context with it).
    let starting = std::thread::Builder::new()
        .name("git-init".into())
        .spawn(bound_network_waits)
        .ok();
    CaBundleDeferral { bundle, starting }
}

/// libgit2 starting without the CA bundle ([`start_deferring_ca_bundle`]).
#[must_use = "finish() puts the environment back"]
pub struct CaBundleDeferral {
    bundle: Option<PathBuf>,
    starting: Option<std::thread::JoinHandle<()>>,
}

impl CaBundleDeferral {
    /// Waits until libgit2 has started, and puts `SSL_CERT_FILE` back as
    /// git2 would have left it. Call before any other thread is made.
    pub fn finish(self) {
        match self.starting.map(std::thread::JoinHandle::join) {
            Some(Ok(())) => {}
            // The helper's panic is this thread's, as it was before the
            // start moved to a thread of its own.
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            // No thread could be made: started here.
            None => bound_network_waits(),
        }
        match &self.bundle {
            Some(file) => std::env::set_var("SSL_CERT_FILE", file),
            None => std::env::remove_var("SSL_CERT_FILE"),
        }
        let _ = DEFERRED.set(self.bundle);
    }
}

/// Loads the deferred CA bundle into libgit2, once, before libgit2's first
/// fetch or push of a remote that is not on this machine: whatever its URL
/// says, a redirect or a `url.<base>.insteadOf` rewrite can still lead to
/// https.
pub(super) fn load_ca_bundle() {
    static LOADED: Once = Once::new();
    let Some(Some(bundle)) = DEFERRED.get() else {
        return;
    };
    LOADED.call_once(|| {
        // SAFETY: every libgit2 network operation waits here until this is done.
        if let Err(e) = unsafe { git2::opts::set_ssl_cert_file(bundle) } {
            tracing::warn!(bundle = %bundle.display(), error = %e, "cannot load the CA bundle for https remotes");
        }
    });
}
