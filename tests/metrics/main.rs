//! The integration tests that read the metrics of an in-process control plane. The metrics registry
//! is process-wide, so these cannot share a process with other servers counting into it: here they
//! are alone (the rest are in `tests/it`).

// A test unwraps (a failure is a failed test with its reason) and waits for real processes in
// real time (it reads the clock directly).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[path = "../it/support/mod.rs"]
mod support;

mod observability;
mod status;

/// Taken by each test for its whole run: they count into one registry, and a server starting
/// resets its counters, so they run one at a time.
pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
