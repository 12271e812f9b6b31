//! Recovery of the data: the point-in-time restore of a failed run's
//! databases, and the writes made after the checkpoint that a restore would
//! lose, kept aside and replayed when asked.

use super::*;

impl Engine {
    pub(super) async fn restore(
        &self,
        run: &RunRecord,
        cache: &mut Option<Database>,
    ) -> Result<crate::checkpoint::RestoreRecord, Fault> {
        let Some(checkpoint) = run.checkpoint.clone() else {
            return Err(Fault::failed("the run has no checkpoint"));
        };
        let point = run.recovery_point.clone().unwrap_or(crate::checkpoint::RecoveryPoint {
            time: checkpoint.completed_at,
            lsn: String::new(),
            capture: None,
        });
        let backend = self.backend_named(&checkpoint.backend)?;
        let db = self.database(run, cache).await.map_err(|f| Fault::failed(f.message))?;
        let (mut lost, sequences) = match self.keep_lost_writes(run, &db, &point).await {
            Some((captured, sequences)) => (Some(captured), sequences),
            None => (None, Vec::new()),
        };
        let quiesced = matches!(point.capture, Some(crate::capture::Capture::Slot { .. }));
        let restored = backend.restore(&db, &checkpoint, &point, &run.id).await;
        // The restored database is resolved again: a CNPG restore recreates
        // the Cluster, whose app secret and CA may be new.
        let db = match &restored {
            Ok(_) => {
                *cache = None;
                self.database(run, cache).await.unwrap_or(db)
            }
            Err(_) => db,
        };
        if let (Ok(_), Some(crate::capture::Captured::Kept(summary))) = (&restored, lost.as_mut()) {
            // At once, before the database is opened again: the application
            // hands out ids from here on. (A restore that brings the database
            // back open leaves the milliseconds since its promotion: an
            // insert then may take a lost row's id, and replay stops at it.)
            match crate::capture::advance_sequences(&db, &sequences).await {
                Ok(done) => {
                    summary.sequences_advanced = Some(done.moved);
                    summary.sequences_not_moved = done.failed;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %chain(&e),
                        "could not move the sequences past the ids the lost writes used; `backstop replay` tries again"
                    );
                    summary.sequences_not_moved = vec![("(all)".into(), chain(&e))];
                }
            }
        }
        // Whatever happened, the application is let back in (a no-op where
        // the restore already took the database back to before the close).
        let reopened = if quiesced {
            crate::capture::reopen(&db).await.err().map(|e| {
                format!(
                    "; the database still refuses connections ({}): run ALTER DATABASE {} ALLOW_CONNECTIONS true",
                    chain(&e),
                    db.dbname()
                )
            })
        } else {
            None
        };
        let mut record = match restored {
            Ok(r) => r,
            Err(e) => return Err(Fault::failed(format!("{}{}", chain(&e), reopened.unwrap_or_default()))),
        };
        if let Some(warning) = reopened {
            tracing::error!("{}", warning.trim_start_matches("; "));
        }
        record.lost_writes = lost;
        Ok(record)
    }

    /// Reads what the restore will discard from the run's slot, writes it to
    /// the run folder, and drops the slot ([`crate::capture`]).
    pub(super) async fn keep_lost_writes(
        &self,
        run: &RunRecord,
        db: &Database,
        point: &crate::checkpoint::RecoveryPoint,
    ) -> Option<(crate::capture::Captured, Vec<crate::capture::sequences::SequenceValue>)> {
        use crate::capture::{self, Capture, Captured};
        let not_kept = |why: String| Some((Captured::NotKept { why }, Vec::new()));
        let (name, horizon) = match point.capture.as_ref()? {
            Capture::Slot { name, xid_horizon, .. } => (name.clone(), *xid_horizon),
            Capture::Unavailable { why, .. } => return not_kept(why.clone()),
        };
        if !self.store.keeps_files() {
            // Read, they would be kept nowhere: do not close the database for that.
            return not_kept(
                "this run store keeps no files (a controller without --durable-state: its --state volume goes with the pod): the writes are not kept".into(),
            );
        }
        let own: std::collections::HashSet<u32> = run
            .migrate_results
            .iter()
            .flat_map(|(_, o)| o.own_xids.iter().copied())
            .collect();
        let kept = async {
            // `read` closes the database first: nothing may commit between
            // the read and the restore.
            let store = |e: crate::run::StoreError| chain(&e);
            let (mut file, own_left_out) = match capture::read(db, &run.id, &name, &point.lsn, horizon, &own).await {
                Ok(read) => read,
                // Resumed after the restore began (the slot gone with the old
                // state, or the restored server not answering yet): an
                // earlier attempt kept them. Not for other errors: the slot
                // may hold writes committed after that attempt.
                Err(e @ (capture::CaptureError::NoSlot { .. } | capture::CaptureError::Connect { .. })) => {
                    let Some(bytes) = self.store.read_file(run, capture::LOST_SUMMARY).await.map_err(store)? else {
                        return Err(chain(&e));
                    };
                    let summary = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                    let sequences = self.lost_file(run).await?.map(|f| f.sequences).unwrap_or_default();
                    return Ok((summary, sequences));
                }
                Err(e) => return Err(chain(&e)),
            };
            file.migrated = Some(capture::replay::migrated_tables(&run.migrations).map(|t| t.into_iter().collect()));
            let json = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
            self.store
                .write_file(run, capture::LOST_FILE, &json)
                .await
                .map_err(store)?;
            let path = self
                .store
                .write_file(run, capture::LOST_SQL, file.sql().as_bytes())
                .await
                .map_err(store)?;
            let summary = file.summary(own_left_out, path);
            let bytes = serde_json::to_vec_pretty(&summary).map_err(|e| e.to_string())?;
            self.store
                .write_file(run, capture::LOST_SUMMARY, &bytes)
                .await
                .map_err(store)?;
            Ok::<_, String>((summary, file.sequences))
        }
        .await;
        // The slot stays until the run's release step: a restore to the
        // recovery point takes it away, and a restore that fails leaves it.
        match kept {
            Ok((summary, sequences)) => {
                tracing::info!(
                    transactions = summary.transactions,
                    "kept the writes the restore discards"
                );
                Some((Captured::Kept(summary), sequences))
            }
            Err(why) => {
                tracing::warn!(error = %why, "could not read the writes the restore discards");
                not_kept(why)
            }
        }
    }

    /// The run's kept `lost-writes.json`, if any; why it cannot be read.
    pub(super) async fn lost_file(&self, run: &RunRecord) -> Result<Option<crate::capture::LostFile>, String> {
        use crate::capture::LOST_FILE;
        match self.store.read_file(run, LOST_FILE).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{LOST_FILE}: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(chain(&e)),
        }
    }

    /// The run's own replay of the writes its restore kept
    /// ([`crate::capture::replay`]): all tables but the migrated ones,
    /// stopping at the first conflict.
    pub(super) async fn replay_lost_writes(
        &self,
        run: &RunRecord,
        cache: &mut Option<Database>,
    ) -> crate::capture::replay::AutoReplay {
        use crate::capture::replay::{self, AutoReplay};
        let not = |why: String| {
            tracing::warn!(error = %why, "the lost writes were not replayed; `backstop replay` can");
            AutoReplay::NotReplayed { why }
        };
        let file = match self.lost_file(run).await {
            Ok(Some(file)) => file,
            Ok(None) => return not(format!("{} is missing", crate::capture::LOST_FILE)),
            Err(why) => return not(why),
        };
        let db = match self.database(run, cache).await {
            Ok(db) => db,
            Err(f) => return not(f.message),
        };
        let migrated = match replay::migrated_tables(&run.migrations) {
            Ok(tables) => tables,
            Err(why) => {
                return not(format!(
                    "{why}; `backstop replay --tables` replays the tables a person names"
                ))
            }
        };
        let how = replay::Options {
            bounded: true,
            ..Default::default()
        };
        match replay::replay(&db, &file, &migrated, &how).await {
            Ok(done) => {
                tracing::info!(
                    applied = done.applied.len(),
                    left = done.left.len(),
                    stopped = done.stopped.is_some(),
                    "replayed the lost writes"
                );
                AutoReplay::Replayed(done)
            }
            Err(e) => not(chain(&e)),
        }
    }
}
