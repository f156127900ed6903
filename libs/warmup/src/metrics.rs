//! The warmup's Prometheus series, recorded through the `metrics` facade (the
//! template-builder exports them when `[builder] metrics_addr` is set).

use std::time::Duration;

/// Counter: warmup tasks that ran to an end, by `result` (`ready`, `failed`). A task
/// superseded by a newer warmup of its template, or cancelled by a delete, is not counted.
pub const WARMUPS: &str = "nanobox_warmups_total";
/// Histogram: seconds a warmup task ran (queueing for a build slot included), by
/// `result`.
pub const WARMUP_DURATION: &str = "nanobox_warmup_duration_seconds";
/// Gauge: warmup tasks running or queued in this process.
pub const WARMUPS_RUNNING: &str = "nanobox_warmups_running";

/// The HELP lines; the template-builder calls it once the recorder is installed.
pub fn describe() {
    metrics::describe_counter!(WARMUPS, "Warmups that ended, by result (ready, failed)");
    metrics::describe_histogram!(
        WARMUP_DURATION,
        metrics::Unit::Seconds,
        "How long warmups ran, queueing included, by result"
    );
    metrics::describe_gauge!(WARMUPS_RUNNING, "Warmups running or queued");
}

/// Counts a warmup task in [`WARMUPS_RUNNING`] while it lives: a task aborted mid-way
/// (superseded, deleted) drops it without reaching [`finished`].
#[derive(Debug)]
pub(crate) struct Running(());

impl Running {
    pub(crate) fn start() -> Self {
        metrics::gauge!(WARMUPS_RUNNING).increment(1.0);
        Self(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics::gauge!(WARMUPS_RUNNING).decrement(1.0);
    }
}

/// A warmup task ended, `ok` (READY) or not, after `elapsed`.
pub(crate) fn finished(ok: bool, elapsed: Duration) {
    let result = if ok { "ready" } else { "failed" };
    metrics::counter!(WARMUPS, "result" => result).increment(1);
    metrics::histogram!(WARMUP_DURATION, "result" => result).record(elapsed.as_secs_f64());
}
