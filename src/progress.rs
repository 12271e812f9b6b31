//! Progress of long work (base backups, restores, dumps, datastore moves),
//! drawn with `indicatif` on standard error only when it is a terminal:
//! piped to a file or a log collector, nothing is drawn and the log stays as
//! it was. `BACKSTOP_PROGRESS=off` turns it off on a terminal too.
//!
//! Work whose output grows on disk shows bytes and rate by watching that
//! path; work that cannot be measured shows a spinner with the elapsed time.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar or spinner, cleared when dropped (the log line that follows says
/// how the work ended).
pub struct Progress {
    bar: ProgressBar,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

fn target() -> ProgressDrawTarget {
    if std::env::var("BACKSTOP_PROGRESS").is_ok_and(|v| v == "off" || v == "0") {
        return ProgressDrawTarget::hidden();
    }
    // Hidden by indicatif itself when standard error is not a terminal.
    ProgressDrawTarget::stderr()
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Progress {
    /// Whether anything is drawn (standard error is a terminal).
    pub fn visible(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// `what`, with the bytes below `path` and their rate, polled while the
    /// work runs (of `total` bytes when known).
    pub fn bytes_of(what: &str, path: PathBuf, total: Option<u64>) -> Self {
        let bar = ProgressBar::with_draw_target(total, target());
        bar.set_style(match total {
            Some(_) => style("{spinner} {msg} {bytes}/{total_bytes} ({bytes_per_sec}, {elapsed}) {wide_bar}"),
            None => style("{spinner} {msg} {bytes} ({bytes_per_sec}, {elapsed})"),
        });
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        let watcher = (!bar.is_hidden()).then(|| {
            let bar = bar.clone();
            tokio::spawn(async move {
                loop {
                    let p = path.clone();
                    if let Ok(size) = tokio::task::spawn_blocking(move || crate::checkpoint::tree_size(&p)).await {
                        bar.set_position(size);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        });
        Progress { bar, watcher }
    }

    /// `what`, counting `total` items (tables, segments).
    pub fn items(what: &str, total: u64, unit: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), target());
        bar.set_style(style(&format!(
            "{{spinner}} {{msg}} {{pos}}/{{len}} {unit} ({{elapsed}}) {{wide_bar}}"
        )));
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar, watcher: None }
    }

    /// `what`, with the elapsed time (work that cannot be measured).
    pub fn spinner(what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, target());
        bar.set_style(style("{spinner} {msg} ({elapsed})"));
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar, watcher: None }
    }

    /// One more item done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// A new message (the step within the work).
    pub fn say(&self, what: &str) {
        self.bar.set_message(what.to_string());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        self.bar.finish_and_clear();
    }
}
