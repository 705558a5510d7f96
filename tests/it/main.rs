//! The control plane's integration tests in one binary (linked once, its tests run side by side):
//! one module per area, `support` shared by all. (Tests that read the process-wide metrics
//! registry through an in-process server live in `tests/metrics`, a process of their own.) Real processes, real TLS over loopback, and
//! SQLite or — with FLOTILLA_TEST_DATABASE_URL — PostgreSQL. The agent and flotctl binaries come
//! from the same build (`cargo test --workspace` builds them; see `support::binary`).

// A test unwraps (a failure is a failed test with its reason) and waits for real processes in
// real time (it reads the clock directly).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

mod access;
mod access_e2e;
mod admission;
mod admission_e2e;
mod api;
mod apply_faults_e2e;
mod boundary_fuzz;
mod certs;
mod certs_e2e;
mod e2e;
mod fleets;
mod fleets_e2e;
mod flotctl_e2e;
mod hardening;
mod install_e2e;
mod push;
mod releases;
mod replicas_e2e;
mod rollouts;
mod rollouts_e2e;
mod startup_e2e;
mod status_e2e;
mod store;
mod tpm;
#[cfg(feature = "tpm-tests")]
mod tpm_e2e;
mod updates_e2e;
