//! A real pgBackRest stanza (Debian's `pgbackrest` package) for a
//! fixture's server.

use std::path::PathBuf;

use super::*;

pub const STANZA: &str = "shop";

/// A stanza for the fixture's server: configuration, repository, the
/// server's `archive_command` pointed at it, `stanza-create`.
pub async fn with_stanza() -> (Fixture, PathBuf) {
    let f = Fixture::new().await;
    let root = f.dir.path().join("pgbackrest");
    for d in ["repo", "log", "lock", "spool"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let config = root.join("pgbackrest.conf");
    std::fs::write(
        &config,
        format!(
            "[global]\nrepo1-path={r}/repo\nlog-path={r}/log\nlock-path={r}/lock\nspool-path={r}/spool\n\
             repo1-retention-full=2\nlog-level-console=warn\n\n[{STANZA}]\npg1-path={data}\npg1-port={port}\npg1-socket-path={sock}\npg1-user=postgres\n",
            r = root.display(),
            data = f.server.data_dir().display(),
            port = f.server.port(),
            sock = f.server.root().display(),
        ),
    )
    .unwrap();
    if let Some((uid, gid)) = f.server.owner() {
        std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(&root)
            .status()
            .unwrap();
    }
    let client = f.client().await;
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET archive_command = 'pgbackrest --config={} --stanza={STANZA} archive-push %p'",
            config.display()
        ))
        .await
        .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let out = pgbackrest(&f, &config, &["stanza-create"]);
    assert!(out.status.success(), "stanza-create: {}", text(&out));
    (f, config)
}

/// Runs pgbackrest as the server's owner.
pub fn pgbackrest(f: &Fixture, config: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("pgbackrest");
    if let Some((uid, gid)) = f.server.owner() {
        cmd.uid(uid).gid(gid);
    }
    cmd.arg(format!("--config={}", config.display()))
        .arg(format!("--stanza={STANZA}"))
        .args(args)
        .output()
        .expect("run pgbackrest (install Debian's pgbackrest package)")
}

/// Labels of the stanza's backups, via pgbackrest itself.
pub fn backups(f: &Fixture, config: &std::path::Path) -> Vec<String> {
    let out = pgbackrest(f, config, &["--output=json", "info"]);
    assert!(out.status.success(), "info: {}", text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info[0]["backup"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_string())
        .collect()
}

/// `backstop run` flags for a pgBackRest checkpoint into the stanza.
pub fn checkpoint_flags(config: &std::path::Path) -> Vec<String> {
    vec![
        "--checkpoint".into(),
        "pgbackrest".into(),
        "--pgbackrest-stanza".into(),
        STANZA.into(),
        "--pgbackrest-config".into(),
        config.display().to_string(),
    ]
}
