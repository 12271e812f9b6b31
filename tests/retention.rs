//! Checkpoint retention (`--keep-checkpoints`): base backups are deleted
//! once newer ended runs replace them; the data directory a restore set
//! aside (the only copy of the data-loss window's writes) is never deleted.

mod common;

use common::*;

#[tokio::test]
async fn checkpoints_beyond_the_newest_kept_are_deleted_but_not_the_data_a_restore_set_aside() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    let out = f.run(&["--keep-checkpoints", "1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.checkpoints(), 1);

    // A failed migration restores: its base backup and the set-aside data
    // directory exist; the older run's checkpoint is let go.
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--keep-checkpoints", "1", "--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back\n{}", text(&out));
    assert_eq!(f.checkpoints(), 1, "only the newest ended run keeps its checkpoint");
    assert_eq!(f.kept_data_dirs(), 1, "the restore set the old data directory aside");
    let failed_run = f.reports().last().unwrap()["run"].as_str().unwrap().to_string();
    assert!(f.state().join("checkpoints").join(&failed_run).exists());

    // The next good run replaces it: the failed run's checkpoint goes (its
    // record says so); the set-aside data directory stays for a person.
    let note = carrier("0003-note").phase("expand").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
    );
    f.commit_carrier(&note, "add note");
    let out = f.run(&["--keep-checkpoints", "1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(f.checkpoints(), 1);
    assert!(!f.state().join("checkpoints").join(&failed_run).exists());
    assert_eq!(f.kept_data_dirs(), 1, "the set-aside data directory is kept");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.state().join("journal").join(format!("{failed_run}.json"))).unwrap())
            .unwrap();
    assert_eq!(record["checkpoint_pruned"], true, "{record}");
}

#[tokio::test]
async fn keep_zero_keeps_every_checkpoint() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    let note = carrier("0002-note").phase("expand").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
    );
    f.commit_carrier(&note, "add note");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    assert_eq!(f.checkpoints(), 2);
}

/// `backstop prune` with `args` on the fixture's state; output and parsed JSON (with `-o json`).
fn prune(f: &Fixture, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let out = std::process::Command::new(bin())
        .arg("prune")
        .arg("--state")
        .arg(f.state())
        .args(args)
        .output()
        .expect("run backstop prune");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

fn items<'a>(report: &'a serde_json::Value, list: &str, what: &str) -> Vec<&'a serde_json::Value> {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["what"] == what)
        .collect()
}

#[tokio::test]
async fn prune_dry_run_lists_what_goes_and_why_the_rest_stays_and_deletes_nothing() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--keep-checkpoints", "0", "--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back\n{}", text(&out));
    let failed_run = f.reports().last().unwrap()["run"].as_str().unwrap().to_string();
    let note = carrier("0003-note").phase("expand").sql(
        "001.sql",
        "SET lock_timeout = '5s';\nALTER TABLE orders ADD COLUMN note text;",
    );
    f.commit_carrier(&note, "add note");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    assert_eq!(f.checkpoints(), 3);
    let bases = f.base_backups();
    assert_eq!(
        bases, 2,
        "the restore began a new timeline, which needs its own base backup"
    );

    let (out, dry) = prune(&f, &["--keep-checkpoints", "1", "--dry-run", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(items(&dry, "deleted", "checkpoint").len(), 2, "{dry:#}");
    assert_eq!(
        items(&dry, "deleted", "base-backup").len(),
        1,
        "the old timeline's base backup: {dry:#}"
    );
    let kept = items(&dry, "kept", "checkpoint");
    assert_eq!(kept.len(), 1);
    assert!(kept[0]["why"].as_str().unwrap().contains("newest 1"), "{dry:#}");
    let aside = items(&dry, "kept", "set-aside");
    assert_eq!(aside.len(), 1, "{dry:#}");
    assert_eq!(aside[0]["run"], failed_run.as_str());
    assert!(aside[0]["why"].as_str().unwrap().contains("--set-aside"), "{dry:#}");
    assert!(dry["freed_bytes"].as_u64().unwrap() > 0);
    // Nothing went.
    assert_eq!(f.checkpoints(), 3);
    assert_eq!(f.base_backups(), bases);
    assert_eq!(f.kept_data_dirs(), 1);

    // The text form says the same to a person.
    let (out, _) = prune(&f, &["--keep-checkpoints", "1", "--dry-run"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("would delete:") && said.contains("kept:") && said.contains("dry run"),
        "{said}"
    );
}

#[tokio::test]
async fn prune_deletes_old_checkpoints_keeps_the_set_aside_data_until_named_and_refuses_bad_names() {
    let f = Fixture::new().await;
    f.commit_carrier(&orders_table(), "create orders");
    assert!(f.run(&["--keep-checkpoints", "0"]).await.status.success());
    let good_run = f.reports().last().unwrap()["run"].as_str().unwrap().to_string();
    f.commit_carrier(&failing_backfill(""), "backfill totals");
    let out = f.run(&["--keep-checkpoints", "0", "--revert", "commit"]).await;
    assert_eq!(out.status.code(), Some(1), "rolled back\n{}", text(&out));
    let failed_run = f.reports().last().unwrap()["run"].as_str().unwrap().to_string();

    // Bad names are refused before anything is deleted.
    for (name, says) in [("nosuchrun", "no such run"), (good_run.as_str(), "did not restore")] {
        let (out, _) = prune(&f, &["--keep-checkpoints", "1", "--set-aside", name]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(
            text(&out).contains(says) && text(&out).contains("nothing was deleted"),
            "{}",
            text(&out)
        );
        assert_eq!(f.checkpoints(), 2, "nothing deleted on a refusal");
    }

    // A running backstop holds the state: prune refuses (exit 4), a dry run still reads.
    {
        let _held = backstop::owner::StateLock::acquire(&f.state()).unwrap();
        let (out, _) = prune(&f, &["--keep-checkpoints", "1"]);
        assert_eq!(out.status.code(), Some(4), "{}", text(&out));
        assert!(prune(&f, &["--keep-checkpoints", "1", "--dry-run"]).0.status.success());
        assert_eq!(f.checkpoints(), 2);
    }

    // Retention: the older run's checkpoint goes, the set-aside data stays.
    let (out, done) = prune(&f, &["--keep-checkpoints", "1", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(items(&done, "deleted", "checkpoint").len(), 1, "{done:#}");
    assert_eq!(f.checkpoints(), 1);
    assert!(f.state().join("checkpoints").join(&failed_run).exists());
    assert_eq!(f.kept_data_dirs(), 1, "the set-aside data directory is kept");
    let record = f.status()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == good_run.as_str())
        .cloned()
        .unwrap();
    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.state().join("journal").join(format!("{good_run}.json"))).unwrap())
            .unwrap();
    assert_eq!(journal["checkpoint_pruned"], true, "{record}");

    // Not while a server runs on it (a person may have started one to read
    // the lost writes): this test process stands in for that server.
    let aside = std::fs::read_dir(f.server.root())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("data.backstop-"))
        .unwrap_or_else(|| panic!("the set-aside directory beside the data directory"));
    let pid_file = aside.join("postmaster.pid");
    let saved = std::fs::read(&pid_file).ok();
    std::fs::write(&pid_file, format!("{}\n{}\n", std::process::id(), aside.display())).unwrap();
    let (out, _) = prune(&f, &["--set-aside", &failed_run]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("runs on"), "{}", text(&out));
    match saved {
        Some(bytes) => std::fs::write(&pid_file, bytes).unwrap(),
        None => std::fs::remove_file(&pid_file).unwrap(),
    }
    // A record whose kept path is not a directory backstop set aside (edited
    // by hand, or hostile) is never deleted.
    let entry = f.state().join("journal").join(format!("{failed_run}.json"));
    let original = std::fs::read(&entry).unwrap();
    let mut edited: serde_json::Value = serde_json::from_slice(&original).unwrap();
    edited["restore"]["kept"] = serde_json::json!(f.state().display().to_string());
    std::fs::write(&entry, serde_json::to_vec(&edited).unwrap()).unwrap();
    let (out, _) = prune(&f, &["--set-aside", &failed_run]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not a data directory backstop set aside"),
        "{}",
        text(&out)
    );
    assert!(f.state().exists());
    std::fs::write(&entry, original).unwrap();

    // A hostile journal entry (an id of "..", oldest of all) names no folder
    // to delete.
    let mut evil = edited_copy(&f, &good_run);
    evil["id"] = serde_json::json!("..");
    evil["created_at"] = serde_json::json!("2000-01-01T00:00:00Z");
    evil["checkpoint_pruned"] = serde_json::json!(false);
    std::fs::write(
        f.state().join("journal").join("evil.json"),
        serde_json::to_vec(&evil).unwrap(),
    )
    .unwrap();
    let (out, done) = prune(&f, &["--keep-checkpoints", "1", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(f.state().join("journal").exists(), "the state survives: {done:#}");
    assert_eq!(f.checkpoints(), 1);
    std::fs::remove_file(f.state().join("journal").join("evil.json")).unwrap();

    // Named by a person (and nothing else asked): only the set-aside data
    // goes, checkpoints stay, and the report says who and when.
    let (out, done) = prune(&f, &["--set-aside", &failed_run, "--by", "alice", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(items(&done, "deleted", "set-aside").len(), 1, "{done:#}");
    assert_eq!(
        done["deleted"].as_array().unwrap().len(),
        1,
        "only the named data: {done:#}"
    );
    assert_eq!(f.checkpoints(), 1);
    assert_eq!(f.kept_data_dirs(), 0);
    let md = f.report_md(&failed_run);
    assert!(md.contains("was deleted by alice"), "{md}");
    // A second time it is already gone: refused, nothing else touched.
    let (out, _) = prune(&f, &["--set-aside", &failed_run]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already gone"), "{}", text(&out));
    assert_eq!(f.checkpoints(), 1);
}

/// A run's journal entry, parsed.
fn edited_copy(f: &Fixture, run: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(f.state().join("journal").join(format!("{run}.json"))).unwrap()).unwrap()
}
