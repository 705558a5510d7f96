//! Device status as the domain sees it: what a device reports about its host (system info), its
//! resource usage and the monitors firing on it, the conditions the control plane derives from
//! that and from the session, and the one-word summary. Pure: no I/O. The agent uses `monitor` and
//! `report`; the control plane all of it.

pub mod conditions;
pub mod field_selector;
pub mod monitor;
mod report;
mod update;

pub use report::{
    Alert, DeviceReport, DriftCheck, DriftItem, FilesystemUsage, NetworkInterface, ReportError,
    ReportUpdate, ResourceUsage, Severity, SystemInfo, WorkloadStatus, check_bounds,
};
pub use update::{UpdateFailure, UpdateKind, UpdatePhase, UpdateState, rfc3339};
