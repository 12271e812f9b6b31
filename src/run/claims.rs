//! The pass's claims on databases: taking one before a run's plan,
//! releasing those a pass owes, and the logins begun ahead for them
//! (`--state/warm.json`). An [`Engine`] concern of its own, apart from
//! scheduling ([`super`]).

use super::{chain, gate, Engine, RunRecord, Wait, WarmTarget};

/// The answer to a claim, as the scheduler sees it.
pub(super) enum Claimed {
    Ours,
    /// Another instance owns the database.
    Theirs(Wait),
    /// The database could not be asked (a transient fault).
    Unknown(String),
    /// The reference does not resolve (bad input the plan refuses).
    Unresolved,
    /// The database refuses the claim (permissions): a person must fix it.
    Refused(String),
}

impl Engine {
    /// Releases claims this instance may still hold (a release that failed,
    /// a run taken over by a person): no run is open when this is called.
    pub(super) async fn release_owed(&self, runs: &[RunRecord]) {
        for carrier in owed(runs) {
            self.release(carrier).await;
        }
    }

    /// Starts the logins this pass's first steps wait for, while it reads
    /// git: a session to each database [`release_owed`](Self::release_owed)
    /// releases (the one a pending migration claims, most of the time),
    /// each resolved and logged in in the background, and keeps them as
    /// the next pass's hint. Those the hint named began before the runs
    /// were read (`early`). Best effort, and nothing more when a run
    /// awaits a person or is open:
    /// - a run that awaits a person holds its database for that person,
    ///   and the pass stops there: the early logins are abandoned and the
    ///   process's idle sessions closed, so none is in the way of what the
    ///   person does (a `DROP DATABASE`), and the hint is emptied (the
    ///   pass that ended the run empties it already, see [`Self::pass`];
    ///   this is for one that died before). Only a pass that began logins
    ///   on a hint closes anything: the controller's store keeps no hint;
    /// - resuming an open run may restore the database, and a login must
    ///   not land in the middle of that: the early ones are given
    ///   [`crate::db::LOGIN_WAIT`] in all to end, and abandoned past that.
    ///   An abandoned login's session is never lent (the restore ends the
    ///   sessions that began before it), and a backend already started
    ///   for it exits when its client goes; the restore also ends every
    ///   session of its database before it replaces it.
    pub(super) async fn warm_up(
        &self,
        runs: &[RunRecord],
        hinted: &[WarmTarget],
        mut early: Vec<tokio::task::JoinHandle<()>>,
    ) {
        let person = runs.iter().any(|r| r.awaits_person());
        let owed: Vec<WarmTarget> = match person {
            true => Vec::new(),
            false => owed(runs)
                .into_iter()
                .map(|c| (c.database.clone(), c.database_name.clone()))
                .collect(),
        };
        if owed != hinted {
            self.store.save_warm_hint(&owed).await;
        }
        if person {
            if !early.is_empty() {
                early.iter().for_each(|login| login.abort());
                crate::db::close_idle();
            }
            return;
        }
        if runs.iter().any(|r| r.is_open()) {
            let all = futures::future::join_all(early.iter_mut());
            let _ = tokio::time::timeout(crate::db::LOGIN_WAIT, all).await;
            early.iter().for_each(|login| login.abort());
            return;
        }
        for target in owed.iter().filter(|t| !hinted.contains(t)) {
            drop(self.prewarm(target));
        }
    }

    /// Resolves `target` and logs in to it in the background, with the
    /// bookkeeping's first statements prepared; the task ends when the
    /// login does.
    pub(super) fn prewarm(&self, target: &WarmTarget) -> tokio::task::JoinHandle<()> {
        let (cluster, (reference, name)) = (self.cluster.clone(), target.clone());
        tokio::spawn(async move {
            if let Ok(db) = cluster.resolve(&reference, name.as_deref()).await {
                if let Some(login) = db.prewarm_session(1, crate::runner::BOOKKEEPING_AHEAD) {
                    // Abandoned with this task: a login given up on does
                    // not go on by itself.
                    let mut login = AbortOnDrop(login);
                    let _ = (&mut login.0).await;
                }
            }
        })
    }

    /// Claims the database of `carrier` for this instance.
    pub(super) async fn claim(&self, carrier: &crate::manifests::Carrier, run: Option<&str>) -> Claimed {
        let db = match self
            .cluster
            .resolve(&carrier.database, carrier.database_name.as_deref())
            .await
        {
            Ok(db) => db,
            // The plan refuses it with the reason; nothing can run there.
            Err(_) => return Claimed::Unresolved,
        };
        let me = crate::owner::Owner::me(&self.settings.owner, run);
        match self.runner.claim(&db, &me).await {
            Ok(crate::owner::Claim::Ours) => Claimed::Ours,
            Ok(crate::owner::Claim::Theirs(owner)) => Claimed::Theirs(Wait::Busy {
                database: db.describe(),
                owner,
            }),
            Err(e) if e.is_transient() => Claimed::Unknown(chain(&e)),
            Err(e) => Claimed::Refused(chain(&e)),
        }
    }

    /// Releases this instance's claim on the database of `carrier` (best
    /// effort: a claim left behind only delays another instance until a
    /// later pass of this one releases it).
    pub(crate) async fn release(&self, carrier: &crate::manifests::Carrier) {
        let released = match self
            .cluster
            .resolve(&carrier.database, carrier.database_name.as_deref())
            .await
        {
            Ok(db) => self
                .runner
                .release(&db, &self.settings.owner)
                .await
                .map_err(|e| chain(&e)),
            Err(e) => Err(chain(&e)),
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the database claim; a later pass releases it");
        }
    }
}

/// How many of the newest runs [`owed`] looks at: at most that many
/// databases are released, and logged in to ahead, by a pass.
pub(super) const OWED_WINDOW: usize = 50;

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The claims a pass releases when no run is open: on the database of
/// each of the newest [`OWED_WINDOW`] runs, once each, except one a run that awaits a
/// person holds (a failed remediation keeps its database claimed).
pub(super) fn owed(runs: &[RunRecord]) -> Vec<&crate::manifests::Carrier> {
    let mut done = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for run in runs.iter().rev().take(OWED_WINDOW) {
        let Some(carrier) = run.migrations.first() else {
            continue;
        };
        let key = gate::database_key(carrier);
        if !done.insert(key.clone()) {
            continue;
        }
        let held = runs
            .iter()
            .any(|r| r.awaits_person() && r.migrations.first().map(gate::database_key).as_ref() == Some(&key));
        if !held {
            out.push(carrier);
        }
    }
    out
}
