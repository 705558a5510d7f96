//! Which caller may call which gRPC method: the one table of the whole server (`METHODS`, each admin
//! method with the right it needs, and `role_has` for what each role holds), consulted by the
//! authentication layer before any handler runs. Pure: no I/O.

use crate::identity::Role;
use std::collections::BTreeSet;

/// What calling a method takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    /// Reading and watching devices, fleets, enrollments, rollouts, certificates and the audit.
    Read,
    /// Changing devices, fleets, rollouts, enrollment decisions and device certificates.
    Operate,
    /// Creating, listing, renewing and revoking credentials.
    Credentials,
    /// Renewing the caller's own credential.
    Own,
}

const ADMIN: &str = "flotilla.admin.v1.";

/// Every admin method, with the right it takes. A method missing here is refused to everyone
/// (a test checks that the table covers the whole API).
pub const METHODS: &[(&str, Right)] = &[
    ("DeviceService/ListDevices", Right::Read),
    ("DeviceService/GetDevice", Right::Read),
    ("DeviceService/WatchDevices", Right::Read),
    ("DeviceService/ApplyDevice", Right::Operate),
    ("DeviceService/LabelDevice", Right::Operate),
    ("DeviceService/DeleteDevice", Right::Operate),
    ("CertificateService/ListCertificates", Right::Read),
    ("CertificateService/RevokeCertificate", Right::Operate),
    ("CertificateService/RenewCertificate", Right::Operate),
    ("RolloutService/GetRollout", Right::Read),
    ("RolloutService/WatchRollout", Right::Read),
    ("RolloutService/PauseRollout", Right::Operate),
    ("RolloutService/ResumeRollout", Right::Operate),
    ("RolloutService/RollbackRollout", Right::Operate),
    ("ServerService/GetServerInfo", Right::Read),
    ("AuditService/ListAudit", Right::Read),
    ("AuditService/GetAuditHead", Right::Read),
    ("AuditService/ListAuditHeads", Right::Read),
    ("FleetService/ListFleets", Right::Read),
    ("FleetService/GetFleet", Right::Read),
    ("FleetService/ListFleetRevisions", Right::Read),
    ("FleetService/ApplyFleet", Right::Operate),
    ("FleetService/DeleteFleet", Right::Operate),
    ("EnrollmentService/ListEnrollments", Right::Read),
    ("EnrollmentService/GetEnrollment", Right::Read),
    ("EnrollmentService/ApproveEnrollment", Right::Operate),
    ("EnrollmentService/DenyEnrollment", Right::Operate),
    ("EnrollmentService/DeleteEnrollment", Right::Operate),
    ("AgentReleaseService/PublishAgentRelease", Right::Operate),
    ("AgentReleaseService/ListAgentReleases", Right::Read),
    ("AgentReleaseService/GetAgentRelease", Right::Read),
    ("AgentReleaseService/DeleteAgentRelease", Right::Operate),
    ("CredentialService/CreateCredential", Right::Credentials),
    ("CredentialService/ListCredentials", Right::Credentials),
    ("CredentialService/GetCredential", Right::Credentials),
    ("CredentialService/RenewCredential", Right::Credentials),
    ("CredentialService/RevokeCredential", Right::Credentials),
    ("CredentialService/RenewOwnCredential", Right::Own),
];

/// Whether a role holds a right by itself. Service credentials hold what their grant says.
pub fn role_has(role: Role, right: Right) -> bool {
    use Right::*;
    match role {
        Role::Admin => true,
        Role::Operator => matches!(right, Read | Operate | Own),
        Role::Viewer => matches!(right, Read | Own),
        Role::Service => matches!(right, Own),
        Role::Device | Role::Enrollment => false,
    }
}

/// The right a method takes, by its short (`DeviceService/ListDevices`) or full name.
pub fn method_right(method: &str) -> Option<Right> {
    let short = method
        .trim_start_matches('/')
        .strip_prefix(ADMIN)
        .unwrap_or(method);
    METHODS.iter().find(|(m, _)| *m == short).map(|(_, r)| *r)
}

/// Whether calling an admin method changes something (and so leaves an audit record, refused or
/// not).
pub fn mutates(method: &str) -> bool {
    match method_right(method) {
        Some(Right::Operate | Right::Own) => true,
        Some(Right::Credentials) => {
            let name = method.rsplit('/').next().unwrap_or(method);
            !(name.starts_with("List") || name.starts_with("Get"))
        }
        Some(Right::Read) | None => false,
    }
}

/// A service credential's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceGrant {
    /// The rights of `operator` or `viewer`.
    ActsAs(Role),
    /// These methods (short names, `DeviceService/ListDevices`), and its own renewal.
    Methods(BTreeSet<String>),
}

/// Why a service credential's grant is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Services act at most as operators.
    #[error("a service may act as operator or viewer, not {0}")]
    Role(&'static str),
    /// A method the admin API does not have.
    #[error("{0:?} is not an admin API method (e.g. DeviceService/ListDevices)")]
    UnknownMethod(String),
    /// A credential-management method, which only admins may be given.
    #[error("{0} manages credentials, which only admin credentials may do")]
    CredentialMethod(String),
    /// A role and a method list at once.
    #[error("give a role to act as or a list of methods, not both")]
    Both,
    /// Neither a role nor a method list.
    #[error("a service credential needs a role to act as or a list of methods")]
    Empty,
}

impl ServiceGrant {
    /// Checks and normalises a grant as requested (`acts_as` or `methods`).
    pub fn parse(acts_as: Option<Role>, methods: &[String]) -> Result<ServiceGrant, GrantError> {
        match (acts_as, methods.is_empty()) {
            (Some(_), false) => Err(GrantError::Both),
            (None, true) => Err(GrantError::Empty),
            (Some(role @ (Role::Operator | Role::Viewer)), true) => Ok(ServiceGrant::ActsAs(role)),
            (Some(role), true) => Err(GrantError::Role(role.kind())),
            (None, false) => {
                let mut set = BTreeSet::new();
                for method in methods {
                    let short = method
                        .trim_start_matches('/')
                        .strip_prefix(ADMIN)
                        .unwrap_or(method.trim_start_matches('/'));
                    match method_right(short) {
                        None => return Err(GrantError::UnknownMethod(method.clone())),
                        Some(Right::Credentials) => {
                            return Err(GrantError::CredentialMethod(short.to_string()));
                        }
                        Some(_) => set.insert(short.to_string()),
                    };
                }
                Ok(ServiceGrant::Methods(set))
            }
        }
    }
}

/// What a verified caller may do: its role and, for services, its grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The caller's role.
    pub role: Role,
    /// What a service credential was given, for services.
    pub service: Option<ServiceGrant>,
}

impl Grant {
    /// The grant of a person's or device's role.
    pub fn of(role: Role) -> Grant {
        Grant {
            role,
            service: None,
        }
    }

    fn allows(&self, method: &str, right: Right) -> bool {
        if role_has(self.role, right) {
            return true;
        }
        match (&self.service, self.role) {
            (Some(ServiceGrant::ActsAs(role)), Role::Service) => role_has(*role, right),
            (Some(ServiceGrant::Methods(methods)), Role::Service) => methods.contains(method),
            _ => false,
        }
    }
}

/// A call the caller's rights do not cover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{role} credentials may not call {path}{why}")]
pub struct Forbidden {
    /// The caller's role.
    pub role: &'static str,
    /// The method called.
    pub path: String,
    why: &'static str,
}

/// Decides whether a caller with `grant` may call the gRPC method at `path`
/// (`/package.Service/Method`).
pub fn authorize(grant: &Grant, path: &str) -> Result<(), Forbidden> {
    use Role::*;
    let role = grant.role;
    let forbidden = |why| Forbidden {
        role: role.kind(),
        path: path.to_string(),
        why,
    };
    let full = path.trim_start_matches('/');
    let (service, _) = full.split_once('/').unwrap_or((full, ""));
    let people = [Admin, Operator, Service, Viewer];
    match service {
        "flotilla.agent.v1.AgentService" if role == Device => Ok(()),
        "flotilla.agent.v1.EnrollmentService" if role == Enrollment => Ok(()),
        "grpc.health.v1.Health" => Ok(()),
        s if s.starts_with("grpc.reflection.") && people.contains(&role) => Ok(()),
        s if s.starts_with(ADMIN) => {
            let short = &full[ADMIN.len()..];
            match method_right(short) {
                Some(right) if grant.allows(short, right) => Ok(()),
                Some(Right::Credentials) => Err(forbidden(" (credentials need the admin role)")),
                Some(Right::Operate) if role == Viewer => {
                    Err(forbidden(" (viewers read and watch only)"))
                }
                Some(_) if role == Service => Err(forbidden(" (not in this service's grant)")),
                Some(_) => Err(forbidden("")),
                None if people.contains(&role) => Err(forbidden(" (no such method)")),
                None => Err(forbidden("")),
            }
        }
        // Unknown services: only people who may see the API surface learn that they do not exist.
        _ if people.contains(&role) => Ok(()),
        _ => Err(forbidden("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    fn may(role: Role, path: &str) -> bool {
        authorize(&Grant::of(role), path).is_ok()
    }

    #[test]
    fn devices_only_reach_their_stream() {
        assert!(may(Device, "/flotilla.agent.v1.AgentService/Session"));
        assert!(!may(Device, "/flotilla.agent.v1.EnrollmentService/Enroll"));
        assert!(!may(Device, "/flotilla.admin.v1.DeviceService/ListDevices"));
        assert!(!may(
            Device,
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }

    #[test]
    fn enrollment_credentials_only_enroll() {
        assert!(may(
            Enrollment,
            "/flotilla.agent.v1.EnrollmentService/Enroll"
        ));
        assert!(!may(Enrollment, "/flotilla.agent.v1.AgentService/Session"));
        assert!(!may(
            Enrollment,
            "/flotilla.admin.v1.EnrollmentService/ApproveEnrollment"
        ));
    }

    /// Every admin method of the API, from the descriptor set the server reflects.
    fn api_methods() -> Vec<String> {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        set.file
            .iter()
            .filter(|f| f.package() == "flotilla.admin.v1")
            .flat_map(|f| f.service.iter())
            .flat_map(|s| {
                s.method
                    .iter()
                    .map(move |m| format!("{}/{}", s.name(), m.name()))
            })
            .collect()
    }

    #[test]
    fn the_table_names_every_admin_method_exactly_once() {
        let methods = api_methods();
        assert!(methods.len() >= 30, "{methods:?}");
        for method in &methods {
            let rows = METHODS.iter().filter(|(m, _)| m == method).count();
            assert_eq!(rows, 1, "{method} must appear once in authz::METHODS");
        }
        assert_eq!(METHODS.len(), methods.len(), "no stale rows");
    }

    /// The documented table, method by method: who may call what.
    #[test]
    fn every_role_against_every_admin_method() {
        for method in api_methods() {
            let path = format!("/flotilla.admin.v1.{method}");
            let right = method_right(&method).unwrap();
            let expected = |role| {
                matches!(
                    (role, right),
                    (Admin, _)
                        | (Operator, Right::Read | Right::Operate | Right::Own)
                        | (Viewer, Right::Read | Right::Own)
                        | (Service, Right::Own)
                )
            };
            for role in [Admin, Operator, Viewer, Service, Device, Enrollment] {
                let result = authorize(&Grant::of(role), &path);
                assert_eq!(result.is_ok(), expected(role), "{role:?} {method}");
                if let Err(e) = result {
                    assert!(e.to_string().contains(&method), "{e}");
                }
            }
        }
    }

    #[test]
    fn refusals_say_why() {
        let viewer = authorize(
            &Grant::of(Viewer),
            "/flotilla.admin.v1.DeviceService/ApplyDevice",
        )
        .unwrap_err();
        assert_eq!(
            viewer.to_string(),
            "viewer credentials may not call /flotilla.admin.v1.DeviceService/ApplyDevice (viewers read and watch only)"
        );
        let operator = authorize(
            &Grant::of(Operator),
            "/flotilla.admin.v1.CredentialService/CreateCredential",
        )
        .unwrap_err();
        assert!(
            operator
                .to_string()
                .ends_with("(credentials need the admin role)")
        );
    }

    #[test]
    fn services_hold_what_they_were_granted() {
        let acting = Grant {
            role: Service,
            service: Some(ServiceGrant::ActsAs(Viewer)),
        };
        assert!(authorize(&acting, "/flotilla.admin.v1.DeviceService/ListDevices").is_ok());
        assert!(authorize(&acting, "/flotilla.admin.v1.DeviceService/ApplyDevice").is_err());
        let listed = Grant {
            role: Service,
            service: Some(
                ServiceGrant::parse(
                    None,
                    &[
                        "flotilla.admin.v1.DeviceService/LabelDevice".into(),
                        "DeviceService/GetDevice".into(),
                    ],
                )
                .unwrap(),
            ),
        };
        assert!(authorize(&listed, "/flotilla.admin.v1.DeviceService/LabelDevice").is_ok());
        assert!(authorize(&listed, "/flotilla.admin.v1.DeviceService/GetDevice").is_ok());
        let refused =
            authorize(&listed, "/flotilla.admin.v1.DeviceService/ListDevices").unwrap_err();
        assert!(
            refused
                .to_string()
                .ends_with("(not in this service's grant)")
        );
        assert!(
            authorize(
                &listed,
                "/flotilla.admin.v1.CredentialService/RenewOwnCredential"
            )
            .is_ok()
        );
    }

    #[test]
    fn bad_grants_are_refused() {
        assert_eq!(
            ServiceGrant::parse(Some(Admin), &[]),
            Err(GrantError::Role("admin"))
        );
        assert_eq!(ServiceGrant::parse(None, &[]), Err(GrantError::Empty));
        assert!(matches!(
            ServiceGrant::parse(None, &["DeviceService/Nope".into()]),
            Err(GrantError::UnknownMethod(_))
        ));
        assert!(matches!(
            ServiceGrant::parse(None, &["CredentialService/CreateCredential".into()]),
            Err(GrantError::CredentialMethod(_))
        ));
        assert_eq!(
            ServiceGrant::parse(Some(Viewer), &["DeviceService/GetDevice".into()]),
            Err(GrantError::Both)
        );
    }
}
