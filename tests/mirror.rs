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

#[tokio::test]
async fn packs_left_by_fetches_are_repacked_once_they_pile_up() {
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
