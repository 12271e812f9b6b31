//! git over SSH with a deploy key against a real sshd (Debian's
//! openssh-server, started on a free loopback port): the push works with the
//! authorized key and a known host key, and is refused with an unknown host
//! key or a key the server does not accept.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;

struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The name of the user the tests run as (the effective uid's, not `$USER`,
/// which `su` and CI runners do not always set to match).
fn login_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .expect("the effective user has a passwd entry")
        .name
}

fn sshd_binary() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/sbin/sshd");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").is_err(),
        "CI must have openssh-server (/usr/sbin/sshd)"
    );
    eprintln!("skipped: /usr/sbin/sshd is not installed (apt-get install openssh-server)");
    None
}

fn start_sshd(authorized: &Path) -> Option<Sshd> {
    let sshd = sshd_binary()?;
    let dir = tempfile::tempdir().unwrap();
    keygen(&dir.path().join("host_key"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let user = login_name();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {auth}\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nStrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\n\
         PermitRootLogin prohibit-password\nAllowUsers {user}\n",
        d = dir.path().display(),
        auth = authorized.display()
    );
    std::fs::write(dir.path().join("sshd_config"), config).unwrap();
    std::fs::create_dir_all("/run/sshd").ok();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(dir.path().join("sshd_config"))
        .spawn()
        .unwrap();
    let mut sshd = Sshd { child, port, dir };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = sshd.child.try_wait().unwrap() {
            panic!("sshd exited before it listened on port {port}: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sshd did not listen on port {port} within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(sshd)
}

fn known_hosts(sshd: &Sshd, out: &Path) {
    let key = std::fs::read_to_string(sshd.dir.path().join("host_key.pub")).unwrap();
    let mut parts = key.split_whitespace();
    let (kind, b64) = (parts.next().unwrap(), parts.next().unwrap());
    std::fs::write(out, format!("[127.0.0.1]:{} {kind} {b64}\n", sshd.port)).unwrap();
}

async fn run(f: &Fixture, url: &str, key: &Path, known: &Path) -> std::process::Output {
    f.run_url(
        url,
        &[
            "--ssh-key",
            &key.display().to_string(),
            "--known-hosts",
            &known.display().to_string(),
        ],
        &[],
    )
    .await
}

#[tokio::test]
async fn push_over_ssh_with_a_deploy_key_checks_the_host_key() {
    let keys = tempfile::tempdir().unwrap();
    let deploy = keys.path().join("deploy");
    keygen(&deploy);
    let stranger = keys.path().join("stranger");
    keygen(&stranger);
    let authorized = keys.path().join("authorized_keys");
    std::fs::copy(keys.path().join("deploy.pub"), &authorized).unwrap();
    let Some(sshd) = start_sshd(&authorized) else { return };
    let f = Fixture::new().await;
    let c1 = f.commit_carrier(&orders_table(), "create orders");
    let user = login_name();
    let url = format!("ssh://{user}@127.0.0.1:{}{}", sshd.port, f.remote.path().display());

    // A known_hosts that lists another key for this host: refused before auth.
    let wrong_hosts = keys.path().join("wrong_known_hosts");
    let other = keys.path().join("stranger.pub");
    let other = std::fs::read_to_string(other).unwrap();
    let mut parts = other.split_whitespace();
    std::fs::write(
        &wrong_hosts,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            sshd.port,
            parts.next().unwrap(),
            parts.next().unwrap()
        ),
    )
    .unwrap();
    let out = run(&f, &url, &deploy, &wrong_hosts).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("SSH host key is not in known_hosts"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("unknown remote ssh hostkey"), "{}", text(&out));

    let known = keys.path().join("known_hosts");
    known_hosts(&sshd, &known);
    // A key the server does not accept.
    let out = run(&f, &url, &stranger, &known).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(f.gate(), f.base);

    let out = run(&f, &url, &deploy, &known).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(f.gate(), c1, "gate pushed over SSH");
}
