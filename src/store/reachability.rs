//! Whether the database answers. Learned from failures (a connection that cannot be had, or one
//! that breaks mid-query) and re-established by one background probe: while the database is known
//! to be down, store operations fail at once with a clear error instead of each waiting out its
//! own connection timeout behind the others. Outage log lines are rate-limited.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How often the probe tries the database while it is down.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// At most one outage log line per this long; the rest are counted.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The database's reachability, shared by every clone of a store.
#[derive(Debug, Default)]
pub struct Reachability {
    down: AtomicBool,
    probing: AtomicBool,
    /// Why the database was last found unreachable.
    reason: Mutex<String>,
}

impl Reachability {
    /// Whether the database answered the last operation.
    pub fn is_reachable(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }

    /// Why it is down (empty while reachable).
    pub fn reason(&self) -> String {
        if self.is_reachable() {
            return String::new();
        }
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records an outage; true if this call is the one that should start the probe.
    pub(super) fn mark_down(&self, reason: &str) -> bool {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %reason, "database unreachable; failing requests fast until it answers again");
        }
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub(super) fn mark_up(&self) {
        self.probing.store(false, Ordering::Release);
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("database reachable again");
        }
    }
}

/// A log line source that speaks at most once per interval, counting what it held back.
struct Throttle {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

static OUTAGE_LOG: Throttle = Throttle {
    last: Mutex::new(None),
    suppressed: AtomicU64::new(0),
};

/// Runs `log` (which writes one outage log line) unless one was written within the last ten
/// seconds; lines held back are counted into the next one's `suppressed` event.
pub fn outage_log(log: impl FnOnce()) {
    let now = Instant::now();
    let mut last = OUTAGE_LOG.last.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
        OUTAGE_LOG.suppressed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    *last = Some(now);
    drop(last);
    let suppressed = OUTAGE_LOG.suppressed.swap(0, Ordering::Relaxed);
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "similar database outage lines were held back in the last interval"
        );
    }
    log();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_starts_one_probe() {
        let reach = Reachability::default();
        assert!(reach.is_reachable());
        assert!(reach.mark_down("refused"));
        assert!(!reach.mark_down("refused again"), "one probe at a time");
        assert!(!reach.is_reachable());
        assert_eq!(reach.reason(), "refused again");
        reach.mark_up();
        assert!(reach.is_reachable() && reach.reason().is_empty());
        assert!(
            reach.mark_down("down again"),
            "a new outage starts a new probe"
        );
    }

    #[test]
    fn outage_lines_are_throttled() {
        let mut written = 0;
        for _ in 0..50 {
            outage_log(|| written += 1);
        }
        assert_eq!(written, 1);
    }
}
