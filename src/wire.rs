//! Conversions between the domain types the control plane, the agent and flotctl share (specs,
//! status reports, rollout policies) and their protobuf form. Shared, so not behind the `server`
//! feature; the server's own conversions are in `transport::convert`.

pub mod rollout;
pub mod spec;
pub mod status;
