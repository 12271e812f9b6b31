//! Creating a migration's Job so that whether it runs is always known.
//!
//! The Job's name is unique to the run and the migration, so the API
//! server stores at most one Job under it. A create whose answer is lost
//! (a server error, a connection dropped after the request went out) may
//! or may not have stored the Job; sending the Job again could run the
//! migration twice (the first may have run, finished and been deleted by
//! its TTL meanwhile). So backstop never sends it again: it holds the name
//! with a Job that runs no pod ([`hold`]). That create answers the
//! question: stored, the name was free (the Job counts as failed, and the
//! data may have changed, so the checkpoint is restored: no create still on
//! its way can start it any more); a conflict, this run's Job was stored
//! and is watched.

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};

use super::{of_this, FENCE_ANNOTATION, WATCH_AGAIN};

/// The Job a run creates for one migration, and where.
#[derive(Clone, Copy)]
pub(crate) struct Ask<'a> {
    pub jobs: &'a Api<Job>,
    pub job: &'a Job,
    /// `Job <namespace>/<name>`, for messages.
    pub what: &'a str,
    pub run: &'a str,
    /// The migration's id.
    pub id: &'a str,
}

/// What creating a migration's Job came to.
pub(crate) enum Created {
    /// The Job exists and is this run's: it is watched.
    Ours,
    /// Certainly no Job was stored: nothing ran.
    Refused(String),
    /// Not stored (throttled, or never sent): the run is tried later.
    Throttled(kube::Error),
    /// This run's Job is not there (deleted, its TTL ran out, or never
    /// stored): it may have run. Its name is held, so no create still on
    /// its way can start it afterwards.
    Gone(String),
    /// Whether a Job will run cannot be told: nothing may be restored
    /// under it, a person decides.
    Unknown(String),
}

/// Creates `job`. Refused, throttled, or not sent at all: nothing was
/// stored. Its answer lost: the name is held ([`hold`]) until `deadline`,
/// and past that whether a Job runs is [`Created::Unknown`].
pub(crate) async fn create(ask: &Ask<'_>, deadline: tokio::time::Instant) -> Created {
    let (jobs, job, what, run, id) = (ask.jobs, ask.job, ask.what, ask.run, ask.id);
    let name = job.metadata.name.clone().unwrap_or_default();
    let why = match jobs.create(&PostParams::default(), job).await {
        Ok(_) => return Created::Ours,
        Err(kube::Error::Api(e)) if e.code == 409 => match jobs.get_opt(&name).await {
            Ok(Some(found)) => return found_at_create(&found, what, run, id),
            Ok(None) => format!("{what} was deleted before it finished"),
            Err(e) => format!("{what} exists, and reading it failed: {e}"),
        },
        Err(kube::Error::Api(e)) if e.code == 429 => return Created::Throttled(kube::Error::Api(e)),
        Err(kube::Error::Api(e)) if refusal(e.code) => {
            return Created::Refused(format!("creating {what} was refused: {e}"));
        }
        Err(e) if unsent(&e) => return Created::Throttled(e),
        Err(e) => format!("creating {what} failed, and whether it was stored cannot be told: {e}"),
    };
    tracing::warn!(job = %what, error = %why, "holding the Job's name to learn whether it runs");
    match hold(ask, deadline, why).await {
        Ok(created) => created,
        Err(e) => Created::Unknown(format!(
            "whether {what} was stored cannot be told (holding its name failed until the migration's timeout: {e}), so it may yet run: nothing is restored under it"
        )),
    }
}

/// A Job found under the name at create time (409).
fn found_at_create(found: &Job, what: &str, run: &str, id: &str) -> Created {
    match found {
        f if is_fence(f) => Created::Gone(format!("{what}'s name is held: an earlier attempt found it gone")),
        f if of_this(f, run, id) => Created::Ours,
        _ => Created::Refused(format!("{what} exists and is not this run's Job for {id}")),
    }
}

/// A Job found under the name of a resumed attempt's.
pub(crate) fn found(found: &Job, what: &str, run: &str, id: &str) -> Created {
    match found {
        f if is_fence(f) => Created::Gone(format!(
            "{what} of the interrupted attempt is gone; it is not run again"
        )),
        f if of_this(f, run, id) => Created::Ours,
        // Not backstop's to stop, and not known not to be this run's.
        _ => Created::Unknown(format!(
            "{what} is held by a Job that is not this run's for {id}: whether this run's ran cannot be told, so nothing is restored"
        )),
    }
}

/// Holds the name of `job` with a Job that runs no pod: `parallelism: 0`,
/// no deadline and no TTL (it never finishes, so nothing deletes it and
/// frees the name), annotated [`FENCE_ANNOTATION`]. A create still on its
/// way then meets it (409) instead of starting the migration after
/// backstop decided what to restore. Stored: [`Created::Gone`] (`why` says
/// what went before). A conflict: whatever holds the name decides
/// ([`found`]). Refused: the name cannot be held, so [`Created::Unknown`].
/// Other errors are tried again until `deadline`, then returned.
pub(crate) async fn hold(ask: &Ask<'_>, deadline: tokio::time::Instant, why: String) -> Result<Created, kube::Error> {
    let (jobs, job, what, run, id) = (ask.jobs, ask.job, ask.what, ask.run, ask.id);
    let fence = fence_of(job, run);
    let name = fence.metadata.name.clone().unwrap_or_default();
    loop {
        let error = match jobs.create(&PostParams::default(), &fence).await {
            Ok(_) => {
                return Ok(Created::Gone(format!(
                    "{why}; its name is now held by a Job that runs no pod, so it is not run again, and it counts as failed"
                )))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => match jobs.get_opt(&name).await {
                Ok(Some(f)) => return Ok(found(&f, what, run, id)),
                // Deleted in between: held again.
                Ok(None) => continue,
                Err(e) => e,
            },
            Err(kube::Error::Api(e)) if refusal(e.code) => {
                return Ok(Created::Unknown(format!(
                    "{why}, and holding its name was refused ({e}): a create still on its way could start it, so nothing is restored"
                )))
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() + WATCH_AGAIN >= deadline {
            return Err(error);
        }
        tracing::debug!(job = %what, error = %error, "holding the Job's name failed; trying again");
        tokio::time::sleep(WATCH_AGAIN).await;
    }
}

/// `job` made into a hold of its name: the same object (name, labels,
/// selector, pod template), but `parallelism: 0`, no deadline, no TTL.
fn fence_of(job: &Job, run: &str) -> Job {
    let mut fence = job.clone();
    fence
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(FENCE_ANNOTATION.into(), run.into());
    if let Some(spec) = fence.spec.as_mut() {
        spec.parallelism = Some(0);
        spec.active_deadline_seconds = None;
        spec.ttl_seconds_after_finished = None;
    }
    fence
}

/// Whether `job` only holds a name ([`hold`]): it runs no pod.
pub(crate) fn is_fence(job: &Job) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(FENCE_ANNOTATION))
}

/// API answers that refuse a request as it stands: nothing was stored.
fn refusal(code: u16) -> bool {
    matches!(code, 400 | 403 | 404 | 422)
}

/// Whether the request certainly never reached the API server: it could
/// not be built or authenticated, or no connection was made.
fn unsent(e: &kube::Error) -> bool {
    if matches!(e, kube::Error::Auth(_) | kube::Error::BuildRequest(_)) {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper_util::client::legacy::Error>() {
            return h.is_connect();
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(annotations: serde_json::Value) -> Job {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m-r1", "labels": {"backstop.dev/run": "r1"},
                "annotations": annotations},
            "spec": {"parallelism": 3, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 0,
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}
        }))
        .unwrap()
    }

    #[test]
    fn a_hold_runs_no_pod_and_never_finishes_so_nothing_frees_the_name() {
        let fence = fence_of(&job(serde_json::json!({"backstop.dev/migration": "0001"})), "r1");
        let spec = fence.spec.clone().unwrap();
        assert_eq!(spec.parallelism, Some(0));
        assert_eq!(spec.active_deadline_seconds, None, "a deadline would end it");
        assert_eq!(
            spec.ttl_seconds_after_finished, None,
            "a TTL would delete it once ended"
        );
        assert!(is_fence(&fence));
        assert_eq!(
            fence.spec.unwrap().template,
            job(serde_json::json!({})).spec.unwrap().template
        );
    }

    #[test]
    fn what_holds_the_name_decides_the_jobs_fate() {
        let ours = job(serde_json::json!({"backstop.dev/migration": "0001"}));
        assert!(matches!(found(&ours, "Job m-r1", "r1", "0001"), Created::Ours));
        assert!(matches!(
            found_at_create(&ours, "Job m-r1", "r1", "0001"),
            Created::Ours
        ));
        let held = fence_of(&ours, "r1");
        assert!(matches!(found(&held, "Job m-r1", "r1", "0001"), Created::Gone(_)));
        assert!(matches!(
            found_at_create(&held, "Job m-r1", "r1", "0001"),
            Created::Gone(_)
        ));
        // Someone else's under the name: not stopped, not restored under.
        assert!(matches!(found(&ours, "Job m-r1", "r2", "0001"), Created::Unknown(_)));
        assert!(matches!(
            found_at_create(&ours, "Job m-r1", "r1", "0002"),
            Created::Refused(_)
        ));
    }
}
