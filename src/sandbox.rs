//! Throwaway git remotes for the demo, the tests and the benchmarks: a bare
//! repository on disk, with commits written straight into its branches.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository, Signature};

/// A bare repository acting as the `sre` remote.
pub struct BareRemote {
    path: PathBuf,
}

/// A file change for [`BareRemote::commit`].
pub enum Change<'a> {
    Write(&'a str, &'a str),
    Remove(&'a str),
}

impl BareRemote {
    /// Creates an empty bare repository at `path`.
    pub fn init(path: &Path) -> Result<Self, git2::Error> {
        Repository::init_bare(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// An existing bare repository.
    pub fn open(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Where the repository is (usable as a remote URL).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The commit `branch` points at.
    pub fn head(&self, branch: &str) -> Result<Option<String>, git2::Error> {
        let repo = Repository::open_bare(&self.path)?;
        Ok(repo
            .refname_to_id(&format!("refs/heads/{branch}"))
            .ok()
            .map(|o| o.to_string()))
    }

    /// Commits `changes` on top of `branch` (creating it) and returns the sha.
    pub fn commit(&self, branch: &str, changes: &[Change<'_>], message: &str) -> Result<String, git2::Error> {
        let repo = Repository::open_bare(&self.path)?;
        let refname = format!("refs/heads/{branch}");
        let parent = repo
            .refname_to_id(&refname)
            .ok()
            .map(|id| repo.find_commit(id))
            .transpose()?;
        let mut index = git2::Index::new()?;
        if let Some(p) = &parent {
            index.read_tree(&p.tree()?)?;
        }
        for change in changes {
            match change {
                Change::Write(path, content) => crate::git::stage_file(&repo, &mut index, path, content.as_bytes())?,
                Change::Remove(path) => index.remove_path(Path::new(path))?,
            }
        }
        let tree = repo.find_tree(index.write_tree_to(&repo)?)?;
        let sig = Signature::now("Dev Eloper", "dev@example.com")?;
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let id = repo.commit(Some(&refname), &sig, &sig, message, &tree, &parents)?;
        Ok(id.to_string())
    }

    /// Points `branch` at `sha` (creating or moving it).
    pub fn set_branch(&self, branch: &str, sha: &str) -> Result<(), git2::Error> {
        let repo = Repository::open_bare(&self.path)?;
        repo.reference(&format!("refs/heads/{branch}"), Oid::from_str(sha)?, true, "sandbox")?;
        Ok(())
    }

    /// Subject lines of `branch`'s first-parent history, newest first.
    pub fn log(&self, branch: &str) -> Result<Vec<String>, git2::Error> {
        let repo = Repository::open_bare(&self.path)?;
        let mut walk = repo.revwalk()?;
        walk.push_ref(&format!("refs/heads/{branch}"))?;
        walk.simplify_first_parent()?;
        walk.map(|id| {
            Ok(repo
                .find_commit(id?)?
                .summary()
                .ok()
                .flatten()
                .unwrap_or("")
                .to_string())
        })
        .collect()
    }

    /// Full message of the commit `branch` points at.
    pub fn message(&self, branch: &str) -> Result<String, git2::Error> {
        let repo = Repository::open_bare(&self.path)?;
        let id = repo.refname_to_id(&format!("refs/heads/{branch}"))?;
        let commit = repo.find_commit(id)?;
        let message = commit.message().unwrap_or("").to_string();
        Ok(message)
    }

    /// Whether `path` exists in the tree of `branch`.
    pub fn has_file(&self, branch: &str, path: &str) -> Result<bool, git2::Error> {
        let repo = Repository::open_bare(&self.path)?;
        let id = repo.refname_to_id(&format!("refs/heads/{branch}"))?;
        let tree = repo.find_commit(id)?.tree()?;
        Ok(tree.get_path(Path::new(path)).is_ok())
    }
}
