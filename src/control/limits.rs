//! Per-key rate limits over fixed windows (certificate issuances per device, recovery attempts per
//! device): a key may act `max` times per window; beyond that it is refused with the time left,
//! and only the first refusal of a window is worth an audit record.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How many times per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// At most this many…
    pub max: u32,
    /// …per this long.
    pub window: Duration,
}

/// A refusal: when to come back, and whether it is the window's first (the one to audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limited {
    pub retry_after: Duration,
    pub first_refusal: bool,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started_ms: i64,
    count: u32,
    refused: bool,
}

/// Keys kept before windows that have ended are swept (bounds memory under a flood of keys).
const SWEEP_AT: usize = 10_000;

#[derive(Debug)]
pub(super) struct Limiter {
    limit: RateLimit,
    windows: Mutex<HashMap<String, Window>>,
}

impl Limiter {
    pub(super) fn new(limit: RateLimit) -> Self {
        Limiter {
            limit,
            windows: Mutex::default(),
        }
    }

    /// Counts one action of `key` at `now_ms`, or refuses it.
    pub(super) fn check(&self, key: &str, now_ms: i64) -> Result<(), Limited> {
        let window_ms = self.limit.window.as_millis() as i64;
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, w| now_ms - w.started_ms < window_ms);
        }
        let window = windows.entry(key.to_string()).or_insert(Window {
            started_ms: now_ms,
            count: 0,
            refused: false,
        });
        if now_ms - window.started_ms >= window_ms {
            *window = Window {
                started_ms: now_ms,
                count: 0,
                refused: false,
            };
        }
        if window.count < self.limit.max {
            window.count += 1;
            return Ok(());
        }
        let left = (window.started_ms + window_ms - now_ms).max(0) as u64;
        let first_refusal = !std::mem::replace(&mut window.refused, true);
        Err(Limited {
            retry_after: Duration::from_millis(left),
            first_refusal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_until_the_window_ends() {
        let limiter = Limiter::new(RateLimit {
            max: 2,
            window: Duration::from_secs(60),
        });
        assert!(limiter.check("d1", 0).is_ok());
        assert!(limiter.check("d1", 1_000).is_ok());
        let refused = limiter.check("d1", 10_000).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(50));
        assert!(refused.first_refusal);
        assert!(!limiter.check("d1", 20_000).unwrap_err().first_refusal);
        assert!(limiter.check("d2", 20_000).is_ok(), "keys are independent");
        assert!(limiter.check("d1", 60_000).is_ok(), "a new window");
    }
}
