//! The git mirror does not decay with use: every fetch leaves a pack, and
//! once more than `GitRepo::PACK_LIMIT` pile up the mirror is repacked.

mod common;

use backstop::git::GitRepo;
use common::*;

fn packs(mirror: &std::path::Path) -> usize {
    std::fs::read_dir(mirror.join("objects/pack"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "pack"))
        .count()
}

/// A bare remote (`r.git`, branch main), a clone of it to commit in (`w`)
/// and where the mirror goes (`m.git`), in a temporary folder.
fn remote_and_work() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let (remote, work, mirror) = (dir.path().join("r.git"), dir.path().join("w"), dir.path().join("m.git"));
    git(
        dir.path(),
        &["init", "-q", "--bare", "-b", "main", remote.to_str().unwrap()],
    );
    git(
        dir.path(),
        &["clone", "-q", remote.to_str().unwrap(), work.to_str().unwrap()],
    );
    git(&work, &["config", "user.email", "dev@example.com"]);
    git(&work, &["config", "user.name", "dev"]);
    (dir, remote, work, mirror)
}

#[tokio::test]
async fn packs_left_by_fetches_are_repacked_once_they_pile_up() {
    let (_dir, remote, work, mirror) = remote_and_work();
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    let mut most = 0;
    for i in 0..(GitRepo::PACK_LIMIT + 8) {
        std::fs::write(work.join(format!("f{i}.txt")), i.to_string()).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", &format!("c{i}")]);
        git(&work, &["push", "-q", "origin", "main"]);
        repo.fetch().await.unwrap();
        most = most.max(packs(&mirror));
    }
    assert!(most > 1, "fetches left no packs to repack (the test proves nothing)");
    assert!(
        packs(&mirror) <= GitRepo::PACK_LIMIT,
        "{} packs after {} fetches",
        packs(&mirror),
        GitRepo::PACK_LIMIT + 8
    );
    // Everything is still there.
    let head = repo.require_branch("main").await.unwrap();
    assert_eq!(head, git(&work, &["rev-parse", "HEAD"]).trim());
    let snap = repo.snapshot(&head, "").await.unwrap();
    assert_eq!(snap.len(), GitRepo::PACK_LIMIT + 8);
}

/// The mirror's handles are kept open between operations: one that read
/// the mirror before git fetched a burst into a new pack (written by another
/// process) still reads every new commit and file.
#[tokio::test]
async fn a_kept_handle_of_the_mirror_reads_what_git_fetched_into_a_new_pack() {
    let (_dir, remote, work, mirror) = remote_and_work();
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    std::fs::write(work.join("first.txt"), "first").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    git(&work, &["push", "-q", "origin", "main"]);
    repo.fetch().await.unwrap();
    let first = repo.require_branch("main").await.unwrap();
    assert_eq!(repo.snapshot(&first, "").await.unwrap().len(), 1);
    // More commits than the in-process copy takes: git fetches them.
    for i in 0..70 {
        std::fs::write(work.join(format!("f{i}.txt")), format!("content {i}")).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", &format!("c{i}")]);
    }
    git(&work, &["push", "-q", "origin", "main"]);
    let _ = std::fs::remove_file(mirror.join("FETCH_HEAD"));
    repo.fetch().await.unwrap();
    assert!(
        mirror.join("FETCH_HEAD").exists(),
        "git did not fetch (the test proves nothing)"
    );
    let head = repo.require_branch("main").await.unwrap();
    assert_eq!(head, git(&work, &["rev-parse", "HEAD"]).trim());
    let snap = repo.snapshot(&head, "").await.unwrap();
    assert_eq!(snap.len(), 71);
    assert_eq!(snap.get("f69.txt").map(|b| b.as_slice()), Some(&b"content 69"[..]));
    let pending = repo.pending(&first, &head, ("first", "main")).await.unwrap();
    assert_eq!(pending.len(), 70);
}

/// Kustomizations on one repository share its mirror and push their gates
/// concurrently: each push lands its own commit on its own branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_from_one_mirror_land_each_commit_on_its_own_branch() {
    let (_dir, remote, work, mirror) = remote_and_work();
    git(&work, &["commit", "-q", "--allow-empty", "-m", "base"]);
    // Two lines of history, one per gate branch.
    let mut lines: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    for (n, line) in lines.iter_mut().enumerate() {
        git(&work, &["checkout", "-q", "-B", &format!("line{n}"), "main"]);
        for i in 0..25 {
            git(
                &work,
                &["commit", "-q", "--allow-empty", "-m", &format!("line{n} c{i}")],
            );
            line.push(git(&work, &["rev-parse", "HEAD"]).trim().to_string());
        }
        git(&work, &["push", "-q", "origin", &format!("line{n}")]);
    }
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    repo.fetch().await.unwrap();
    let (a, b) = (repo.clone(), repo.clone());
    for (i, (sa, sb)) in lines[0].iter().zip(&lines[1]).enumerate() {
        let (a2, b2, sa2, sb2) = (a.clone(), b.clone(), sa.clone(), sb.clone());
        let pa = tokio::spawn(async move { a2.push(&sa2, "gate-a").await });
        let pb = tokio::spawn(async move { b2.push(&sb2, "gate-b").await });
        pa.await.unwrap().unwrap();
        pb.await.unwrap().unwrap();
        let on = |branch: &str| {
            git(remote.as_path(), &["rev-parse", &format!("refs/heads/{branch}")])
                .trim()
                .to_string()
        };
        assert_eq!(&on("gate-a"), sa, "gate-a after push {i}");
        assert_eq!(&on("gate-b"), sb, "gate-b after push {i}");
    }
    // No push refs are left behind in the mirror.
    let left = git(&mirror, &["for-each-ref", "refs/backstop/"]);
    assert!(left.trim().is_empty(), "push refs left in the mirror: {left}");
}

/// Two GitRepositories (branches) on one URL share the mirror; a new
/// artifact of one fetches at once even while the other's hint is
/// unchanged and the last fetch is young.
#[tokio::test]
async fn a_new_artifact_of_one_gitrepository_fetches_although_another_on_the_mirror_is_unchanged() {
    let (_dir, remote, work, mirror) = remote_and_work();
    git(&work, &["commit", "-q", "--allow-empty", "-m", "base"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let hour = std::time::Duration::from_secs(3600);
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    let (shop, billing) = (
        repo.clone().for_source("default/sre"),
        repo.clone().for_source("default/sre-billing"),
    );
    shop.hint_source(Some("gate@sha1:1".into()), hour);
    billing.hint_source(Some("gate-billing@sha1:1".into()), hour);
    shop.fetch().await.unwrap();
    git(&work, &["commit", "-q", "--allow-empty", "-m", "new"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let new = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
    // billing's source has a new artifact; shop's hint comes in after it.
    billing.hint_source(Some("gate-billing@sha1:2".into()), hour);
    shop.hint_source(Some("gate@sha1:1".into()), hour);
    shop.fetch().await.unwrap();
    assert_ne!(
        repo.require_branch("main").await.unwrap(),
        new,
        "shop's unchanged source fetched again within max_age (the test proves nothing)"
    );
    billing.fetch().await.unwrap();
    assert_eq!(
        repo.require_branch("main").await.unwrap(),
        new,
        "billing's new artifact was not fetched"
    );
}

/// A snapshot of several paths reads each path's subtree alone and holds
/// exactly the files `git ls-tree -r` lists under them: nested and
/// overlapping paths, a path naming a file, a missing path.
#[tokio::test]
async fn a_snapshot_of_several_paths_holds_exactly_what_git_lists_under_them() {
    let (_dir, remote, work, mirror) = remote_and_work();
    for f in [
        "apps/a/x.yaml",
        "apps/a/m/1.yaml",
        "apps/ab/y.yaml",
        "apps/b/z.yaml",
        "apps/c.yaml",
        "top.yaml",
    ] {
        let path = work.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("file: {f}\n")).unwrap();
    }
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "files"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    repo.fetch().await.unwrap();
    let head = repo.require_branch("main").await.unwrap();
    let cases: &[&[&str]] = &[
        &["apps/a"],
        &["./apps/a/", "apps/a/m"],
        &["apps/a", "apps/b", "apps/missing"],
        &["apps/c.yaml", "top.yaml"],
        &[""],
        &["apps", "apps/b"],
    ];
    for paths in cases {
        let snap = repo.snapshot_paths(&head, paths).await.unwrap();
        let mut args = vec!["ls-tree", "-r", "--name-only", head.as_str(), "--"];
        let cleaned: Vec<String> = paths
            .iter()
            .map(|p| p.trim_start_matches("./").trim_matches('/').to_string())
            .collect();
        if !cleaned.iter().any(|p| p.is_empty()) {
            args.extend(cleaned.iter().map(String::as_str));
        }
        let listed: Vec<String> = git(&mirror, &args).lines().map(str::to_string).collect();
        let got: Vec<String> = snap.keys().cloned().collect();
        assert_eq!(got, listed, "snapshot of {paths:?}");
        for (path, content) in &snap {
            assert_eq!(String::from_utf8_lossy(content), format!("file: {path}\n"));
        }
    }
}

/// Which guarded paths the pending commits touch, asked by every
/// Kustomization of a gate: per path, over the union of the commits'
/// changes (a file added and removed again counts), None when the gate is
/// missing or upstream does not descend from it.
#[tokio::test]
async fn pending_touches_names_the_paths_the_pending_commits_change() {
    let (_dir, remote, work, mirror) = remote_and_work();
    let write = |f: &str, c: &str| {
        let path = work.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    };
    let commit = |m: &str| {
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "--allow-empty", "-m", m]);
    };
    write("apps/a/x.yaml", "a: 1\n");
    write("apps/b/x.yaml", "b: 1\n");
    commit("base");
    git(&work, &["push", "-q", "origin", "main", "main:gate"]);
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    repo.fetch().await.unwrap();
    assert_eq!(
        repo.pending_touches("gate", "main", "apps/a").await.unwrap(),
        Some(false)
    );
    assert_eq!(repo.pending_touches("nogate", "main", "apps/a").await.unwrap(), None);
    write("apps/a/x.yaml", "a: 2\n");
    commit("a");
    write("apps/d/tmp.yaml", "d: 1\n");
    commit("d added");
    std::fs::remove_file(work.join("apps/d/tmp.yaml")).unwrap();
    commit("d removed");
    write("infra/x.yaml", "i: 1\n");
    commit("infra");
    git(&work, &["push", "-q", "origin", "main"]);
    repo.fetch().await.unwrap();
    for (path, want) in [
        ("apps/a", true),
        ("./apps/a/", true),
        ("apps/b", false),
        ("apps/d", true),
        ("apps", true),
        ("apps/ab", false),
        ("infra", true),
    ] {
        assert_eq!(
            repo.pending_touches("gate", "main", path).await.unwrap(),
            Some(want),
            "{path}"
        );
    }
    // The gate on a line of its own: unknown.
    git(&work, &["checkout", "-q", "-b", "side", "HEAD~4"]);
    commit("side");
    git(&work, &["push", "-q", "-f", "origin", "side:gate"]);
    repo.fetch().await.unwrap();
    assert_eq!(repo.pending_touches("gate", "main", "apps/b").await.unwrap(), None);
}

/// A push that is not a fast-forward is refused and moves nothing; a
/// fast-forward moves the branch, and the mirror records where the remote's
/// branch now is.
#[tokio::test]
async fn a_push_is_refused_unless_a_fast_forward_and_the_mirror_follows() {
    let (_dir, remote, work, mirror) = remote_and_work();
    let commit = |name: &str| {
        std::fs::write(work.join(name), name).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", name]);
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&work)
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let a = commit("a");
    let b = commit("b");
    git(
        &work,
        &["push", "-q", "origin", "main", &format!("{a}:refs/heads/other")],
    );
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    repo.fetch().await.unwrap();
    // main is at b: pushing a would go backwards.
    let err = repo.push(&a, "main").await.unwrap_err();
    assert!(backstop::run::chain(&err).contains("fastforward"), "{err:?}");
    let remote_main = |name: &str| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&remote)
            .args(["rev-parse", &format!("refs/heads/{name}")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(remote_main("main"), b, "a rejected push moves nothing");
    // other is at a: b is a fast-forward.
    repo.push(&b, "other").await.unwrap();
    assert_eq!(remote_main("other"), b);
    assert_eq!(repo.branch("other").await.unwrap().as_deref(), Some(b.as_str()));
}

/// `refs/heads/*` of `remote` as `git for-each-ref` lists them, under the
/// mirror's `refs/remotes/origin/*` names.
fn branches(repo: &std::path::Path, prefix: &str) -> String {
    git(repo, &["for-each-ref", "--format=%(objectname) %(refname)", prefix]).replace(prefix, "")
}

#[tokio::test]
async fn fetches_of_a_local_remote_mirror_every_branch_whatever_the_history_seeded() {
    // Seeded random histories: commits in nested folders, submodule
    // entries, new and deleted branches, force-pushes that drop commits,
    // bursts above the in-process copy's caps. After every fetch the mirror
    // holds exactly the remote's branches, with every object they reach;
    // a few commits are copied in process (git's fetch, which writes
    // FETCH_HEAD, did not run), a burst is fetched by git.
    let seeds: Vec<u64> = std::env::var("BACKSTOP_MIRROR_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    for seed in seeds {
        let (_dir, remote, work, mirror) = remote_and_work();
        let mut rng = SplitMix(seed);
        std::fs::write(work.join("base.txt"), "base").unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "base"]);
        git(&work, &["push", "-q", "origin", "main"]);
        let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
        repo.fetch().await.unwrap();
        let mut n = 0;
        for round in 0..25 {
            let burst = rng.chance(10);
            let commits = if burst { 70 } else { 1 + rng.below(3) };
            for _ in 0..commits {
                n += 1;
                let dir = work.join(format!("apps/a{}/b{}", rng.below(3), rng.below(3)));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("f{}.yaml", rng.below(5))), format!("n: {n}\n")).unwrap();
                git(&work, &["add", "-A"]);
                if rng.chance(10) {
                    // A submodule entry: its commit is in another repository.
                    let sha = format!("{:040x}", rng.next() as u128 * 7919 + n as u128);
                    git(
                        &work,
                        &["update-index", "--add", "--cacheinfo", &format!("160000,{sha},sub{n}")],
                    );
                }
                git(&work, &["commit", "-q", "-m", &format!("c{n}")]);
            }
            git(&work, &["push", "-q", "origin", "HEAD:main"]);
            if rng.chance(30) {
                git(
                    &work,
                    &[
                        "push",
                        "-q",
                        "origin",
                        &format!("HEAD~1:refs/heads/topic{}", rng.below(3)),
                    ],
                );
            }
            if rng.chance(20) {
                let gone = format!("topic{}", rng.below(3));
                let _ = std::process::Command::new("git")
                    .arg("-C")
                    .arg(&remote)
                    .args(["branch", "-D", &gone])
                    .output();
            }
            if rng.chance(15) {
                // A force-push that drops the newest commit.
                git(&work, &["reset", "-q", "--hard", "HEAD~1"]);
                git(&work, &["push", "-q", "-f", "origin", "HEAD:main"]);
            }
            let _ = std::fs::remove_file(mirror.join("FETCH_HEAD"));
            repo.fetch().await.unwrap();
            let ctx = format!("seed {seed} round {round} (BACKSTOP_MIRROR_SEEDS={seed})");
            assert_eq!(
                branches(&mirror, "refs/remotes/origin/"),
                branches(&remote, "refs/heads/"),
                "{ctx}"
            );
            git(&mirror, &["fsck", "--connectivity-only", "--no-dangling"]);
            assert_eq!(
                mirror.join("FETCH_HEAD").exists(),
                burst,
                "{ctx}: git fetched only the burst"
            );
        }
    }
}

#[tokio::test]
async fn a_local_remote_with_a_branch_on_a_tree_is_mirrored_and_one_on_a_missing_object_fails_leaving_the_mirror_as_it_was(
) {
    let (_dir, remote, work, mirror) = remote_and_work();
    std::fs::write(work.join("a.txt"), "a").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "a"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let repo = GitRepo::open(&mirror, remote.to_str().unwrap()).await.unwrap();
    repo.fetch().await.unwrap();
    // A branch written by hand onto a tree (git itself refuses to): the
    // in-process copy leaves it to git, which fetches it as it is.
    let tree = git(&remote, &["rev-parse", "main^{tree}"]);
    std::fs::write(remote.join("refs/heads/odd"), &tree).unwrap();
    std::fs::write(work.join("b.txt"), "b").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "b"]);
    git(&work, &["push", "-q", "origin", "main"]);
    repo.fetch().await.unwrap();
    assert_eq!(
        branches(&mirror, "refs/remotes/origin/"),
        branches(&remote, "refs/heads/")
    );
    let before = branches(&mirror, "refs/remotes/origin/");
    // A branch on an object the remote does not have: the fetch fails and
    // no ref of the mirror moves.
    std::fs::write(work.join("c.txt"), "c").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "c"]);
    git(&work, &["push", "-q", "origin", "main"]);
    std::fs::write(remote.join("refs/heads/broken"), format!("{}\n", "1".repeat(40))).unwrap();
    let err = repo.fetch().await.unwrap_err();
    assert!(err.to_string().contains("failed to fetch"), "{err}");
    assert_eq!(branches(&mirror, "refs/remotes/origin/"), before);
    git(&mirror, &["fsck", "--connectivity-only", "--no-dangling"]);
}

#[tokio::test]
async fn a_push_to_a_repository_with_a_work_tree_is_refused_and_moves_nothing() {
    // Given as its `.git` folder, a clone with a work tree opens like a bare
    // repository; moving one of its branches under the work tree would make
    // the next commit there undo what the gate carries. libgit2 refuses it.
    let (_dir, remote, work, mirror) = remote_and_work();
    std::fs::write(work.join("a.txt"), "a").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "a"]);
    git(&work, &["push", "-q", "origin", "main"]);
    let a = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
    std::fs::write(work.join("b.txt"), "b").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "b"]);
    let b = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
    git(&work, &["branch", "gate", &a]);
    let _ = remote;
    let repo = GitRepo::open(&mirror, work.join(".git").to_str().unwrap())
        .await
        .unwrap();
    repo.fetch().await.unwrap();
    assert!(repo.push(&b, "gate").await.is_err());
    assert_eq!(git(&work, &["rev-parse", "gate"]).trim(), a, "the branch did not move");
}
