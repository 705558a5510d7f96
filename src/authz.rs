//! Which roles may call which gRPC method. One table for the whole server, consulted by the
//! authentication layer before any handler runs. Pure: no I/O.

use crate::identity::Role;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{role} credentials may not call {path}")]
pub struct Forbidden {
    pub role: &'static str,
    pub path: String,
}

/// Methods whose names start with these only read state.
const READ_PREFIXES: &[&str] = &["List", "Get", "Watch", "Describe"];

/// Decides whether `role` may call the gRPC method at `path` (`/package.Service/Method`).
pub fn authorize(role: Role, path: &str) -> Result<(), Forbidden> {
    use Role::*;
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let allowed: &[Role] = match service {
        "flotilla.agent.v1.AgentService" => &[Device],
        "flotilla.agent.v1.EnrollmentService" => &[Enrollment],
        s if s.starts_with("flotilla.admin.v1.") => {
            if READ_PREFIXES.iter().any(|p| method.starts_with(p)) {
                &[Admin, Operator, Service, Viewer]
            } else {
                &[Admin, Operator, Service]
            }
        }
        "grpc.health.v1.Health" => &[Admin, Operator, Service, Viewer, Device, Enrollment],
        s if s.starts_with("grpc.reflection.") => &[Admin, Operator, Service, Viewer],
        // Unknown methods: only people who may see the API surface learn that they do not exist.
        _ => &[Admin, Operator, Service, Viewer],
    };
    if allowed.contains(&role) {
        Ok(())
    } else {
        Err(Forbidden {
            role: role.kind(),
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    #[test]
    fn devices_only_reach_their_stream() {
        assert!(authorize(Device, "/flotilla.agent.v1.AgentService/Session").is_ok());
        assert!(authorize(Device, "/flotilla.agent.v1.EnrollmentService/Enroll").is_err());
        assert!(authorize(Device, "/flotilla.admin.v1.DeviceService/ListDevices").is_err());
        assert!(
            authorize(
                Device,
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            )
            .is_err()
        );
    }

    #[test]
    fn enrollment_credentials_only_enroll() {
        assert!(authorize(Enrollment, "/flotilla.agent.v1.EnrollmentService/Enroll").is_ok());
        assert!(authorize(Enrollment, "/flotilla.agent.v1.AgentService/Session").is_err());
        assert!(
            authorize(
                Enrollment,
                "/flotilla.admin.v1.EnrollmentService/ApproveEnrollment"
            )
            .is_err()
        );
    }

    #[test]
    fn viewers_read_and_operators_write() {
        let list = "/flotilla.admin.v1.DeviceService/ListDevices";
        let apply = "/flotilla.admin.v1.DeviceService/ApplyDevice";
        assert!(authorize(Viewer, list).is_ok());
        assert!(authorize(Viewer, apply).is_err());
        for role in [Admin, Operator, Service] {
            assert!(authorize(role, apply).is_ok());
        }
        assert!(authorize(Admin, "/flotilla.agent.v1.AgentService/Session").is_err());
    }
}
