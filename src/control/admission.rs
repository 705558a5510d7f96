//! Admission control for management sessions: a bounded number of sessions may be in the middle of
//! opening at once, and a bounded number may be open in all. An agent turned away is told when to
//! come back (spread by jitter), so a fleet reconnecting after an outage arrives as a steady stream
//! instead of a queue that grows faster than it drains.

use super::ControlError;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on sessions.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Sessions being opened (Hello received, not yet accepted) at the same time.
    pub max_opening: usize,
    /// Sessions open in all; 0 means no limit.
    pub max_sessions: usize,
    /// An agent turned away is asked to come back after this, plus up to as much again of jitter.
    pub retry_after: Duration,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings {
            max_opening: 256,
            max_sessions: 0,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// The gate every new session passes.
#[derive(Debug)]
pub(super) struct Admission {
    opening: Arc<Semaphore>,
    settings: AdmissionSettings,
}

/// Held while a session is being opened.
#[derive(Debug)]
pub struct OpeningPermit {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    pub(super) fn new(settings: AdmissionSettings) -> Self {
        Admission {
            opening: Arc::new(Semaphore::new(settings.max_opening.max(1))),
            settings,
        }
    }

    /// Admits one more session, given how many are open now (asked only when there is a limit),
    /// or says when to retry.
    pub(super) fn admit(
        &self,
        open_sessions: impl FnOnce() -> usize,
    ) -> Result<OpeningPermit, ControlError> {
        if self.settings.max_sessions > 0 && open_sessions() >= self.settings.max_sessions {
            crate::telemetry::session_refused("max_sessions");
            return Err(self.overloaded(format!(
                "this control plane holds its maximum of {} sessions",
                self.settings.max_sessions
            )));
        }
        match self.opening.clone().try_acquire_owned() {
            Ok(permit) => Ok(OpeningPermit { _permit: permit }),
            Err(_) => {
                crate::telemetry::session_refused("opening");
                Err(self.overloaded(format!(
                    "{} sessions are being opened; come back later",
                    self.settings.max_opening
                )))
            }
        }
    }

    fn overloaded(&self, message: String) -> ControlError {
        let base = self.settings.retry_after;
        let jitter = rand::rng().random_range(0..=base.as_millis().max(1) as u64);
        ControlError::Overloaded {
            message,
            retry_after: base + Duration::from_millis(jitter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_opening: usize, max_sessions: usize) -> Admission {
        Admission::new(AdmissionSettings {
            max_opening,
            max_sessions,
            retry_after: Duration::from_millis(100),
        })
    }

    fn retry_after(error: ControlError) -> Duration {
        match error {
            ControlError::Overloaded { retry_after, .. } => retry_after,
            other => panic!("expected Overloaded, got {other:?}"),
        }
    }

    #[test]
    fn opening_is_bounded_and_permits_come_back() {
        let gate = admission(2, 0);
        let first = gate.admit(|| 0).unwrap();
        let _second = gate.admit(|| 0).unwrap();
        let wait = retry_after(gate.admit(|| 0).unwrap_err());
        assert!(
            (Duration::from_millis(100)..=Duration::from_millis(200)).contains(&wait),
            "{wait:?}"
        );
        drop(first);
        gate.admit(|| 0)
            .expect("a finished opening frees its place");
    }

    #[test]
    fn open_sessions_are_bounded_when_configured() {
        let gate = admission(8, 3);
        gate.admit(|| 2).unwrap();
        retry_after(gate.admit(|| 3).unwrap_err());
        admission(8, 0)
            .admit(|| 1_000_000)
            .expect("0 means no limit");
    }

    #[test]
    fn retry_hints_are_spread() {
        let gate = admission(1, 0);
        let _held = gate.admit(|| 0).unwrap();
        let hints: std::collections::BTreeSet<_> = (0..50)
            .map(|_| retry_after(gate.admit(|| 0).unwrap_err()))
            .collect();
        assert!(hints.len() > 10, "{hints:?}");
    }
}
