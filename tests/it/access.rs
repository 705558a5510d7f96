//! Access control through the real server over mTLS: credentials as resources (created from a CSR,
//! listed, renewed, revoked — the bootstrap admin too), every role against every admin method of
//! the table, service grants, and bad input that stores nothing.

use crate::support;

use flotilla::client::ClientCredentials;
use flotilla::identity::{Identity, Role};
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::audit_service_client::AuditServiceClient;
use flotilla::proto::admin::v1::certificate_service_client::CertificateServiceClient;
use flotilla::proto::admin::v1::credential_service_client::CredentialServiceClient;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use std::time::Duration;
use support::{TestServer, channel, csr, wait_for};
use tonic::Code;

/// Creates a credential through the API and returns what its holder connects with.
async fn create(
    server: &TestServer,
    name: &str,
    role: pb::CredentialRole,
    grant: Option<pb::ServiceGrant>,
) -> ClientCredentials {
    create_with(server, name, role, grant, "").await
}

async fn create_with(
    server: &TestServer,
    name: &str,
    role: pb::CredentialRole,
    grant: Option<pb::ServiceGrant>,
    scope: &str,
) -> ClientCredentials {
    let key = rcgen::KeyPair::generate().unwrap();
    let issued =
        CredentialServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
            .create_credential(pb::CreateCredentialRequest {
                name: name.into(),
                role: role as i32,
                grant,
                scope: scope.into(),
                csr_pem: csr(&key),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(issued.credential.unwrap().scope, scope);
    ClientCredentials {
        ca_pem: issued.ca_pem,
        cert_pem: issued.certificate_pem,
        key_pem: key.serialize_pem(),
        server_name: "localhost".into(),
    }
}

/// Every admin method of the API (`Service/Method`) and whether it streams.
fn api_methods() -> Vec<(String, bool)> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(flotilla::proto::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .filter(|f| f.package() == "flotilla.admin.v1")
        .flat_map(|f| f.service.iter())
        .flat_map(|s| {
            s.method
                .iter()
                .map(move |m| (format!("{}/{}", s.name(), m.name()), m.server_streaming()))
        })
        .collect()
}

/// Calls `method` with an empty request: what matters is whether the auth layer let it through.
async fn call(
    channel: tonic::transport::Channel,
    method: &str,
    streaming: bool,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/flotilla.admin.v1.{method}").parse().unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let request = tonic::Request::new(());
    if streaming {
        let mut stream = grpc
            .server_streaming(request, path, codec)
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            Ok(Err(status)) => Err(status),
            _ => Ok(()),
        }
    } else {
        grpc.unary(request, path, codec).await.map(|_| ())
    }
}

#[tokio::test]
async fn every_role_against_every_admin_method() {
    use pb::CredentialRole as R;
    let server = TestServer::start().await;
    let creds = [
        (
            "admin",
            create(&server, "second-admin", R::Admin, None).await,
        ),
        ("operator", create(&server, "ops", R::Operator, None).await),
        ("viewer", create(&server, "dash", R::Viewer, None).await),
        (
            "service-as-viewer",
            create(
                &server,
                "reporter",
                R::Service,
                Some(pb::ServiceGrant {
                    acts_as: R::Viewer as i32,
                    methods: vec![],
                }),
            )
            .await,
        ),
        (
            "service-as-operator",
            create(
                &server,
                "ci",
                R::Service,
                Some(pb::ServiceGrant {
                    acts_as: R::Operator as i32,
                    methods: vec![],
                }),
            )
            .await,
        ),
        (
            "service-methods",
            create(
                &server,
                "labeller",
                R::Service,
                Some(pb::ServiceGrant {
                    acts_as: 0,
                    methods: vec![
                        "DeviceService/GetDevice".into(),
                        "flotilla.admin.v1.DeviceService/LabelDevice".into(),
                    ],
                }),
            )
            .await,
        ),
    ];
    let methods = api_methods();
    assert!(methods.len() >= 30);
    for (who, creds) in &creds {
        let channel = channel(&server.admin_url, creds).await;
        for (method, streaming) in &methods {
            let (service, name) = method.split_once('/').unwrap();
            let read = ["List", "Get", "Watch"].iter().any(|p| name.starts_with(p));
            let credentials = service == "CredentialService" && name != "RenewOwnCredential";
            let own = name == "RenewOwnCredential";
            let expected = match *who {
                "admin" => true,
                "operator" | "service-as-operator" => !credentials,
                "viewer" | "service-as-viewer" => own || (read && !credentials),
                "service-methods" => {
                    own || method == "DeviceService/GetDevice"
                        || method == "DeviceService/LabelDevice"
                }
                _ => unreachable!(),
            };
            let result = call(channel.clone(), method, *streaming).await;
            match result {
                Err(status) if status.code() == Code::PermissionDenied => {
                    assert!(
                        !expected,
                        "{who} was refused {method}: {}",
                        status.message()
                    );
                    assert!(
                        status.message().contains(method.as_str()),
                        "the refusal names the method: {}",
                        status.message()
                    );
                }
                Err(status) if status.code() == Code::Unauthenticated => {
                    panic!("{who} {method}: {}", status.message())
                }
                _ => assert!(expected, "{who} may not call {method}, but did: {result:?}"),
            }
        }
    }
}

#[tokio::test]
async fn credentials_are_listed_and_a_forged_certificate_is_refused() {
    let server = TestServer::start().await;
    let admin = channel(&server.admin_url, &server.admin_creds()).await;
    let viewer = create(&server, "dash", pb::CredentialRole::Viewer, None).await;
    DeviceServiceClient::new(channel(&server.admin_url, &viewer).await)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    let listed = CredentialServiceClient::new(admin.clone())
        .list_credentials(pb::ListCredentialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .credentials;
    let names: Vec<&str> = listed
        .iter()
        .filter(|c| c.role() != pb::CredentialRole::Enrollment)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["admin", "dash"],
        "the bootstrap admin is a credential too"
    );
    let dash = listed.iter().find(|c| c.name == "dash").unwrap();
    assert_eq!(dash.role(), pb::CredentialRole::Viewer);
    assert_eq!(dash.identity, "flotilla://viewer/dash");
    assert_eq!(dash.created_by, "admin/admin");
    assert!(!dash.serial.is_empty() && dash.not_after.is_some());
    assert_eq!(listed[0].created_by, "bootstrap");

    // A certificate signed with the CA key for a name nobody created.
    let forged = server.creds_for(Identity::new(Role::Viewer, "ghost"));
    let status = DeviceServiceClient::new(channel(&server.admin_url, &forged).await)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status
            .message()
            .contains("flotilla://viewer/ghost is not a registered credential"),
        "{}",
        status.message()
    );

    // Its creation is in the audit trail, by name, and the chain still verifies.
    let records = AuditServiceClient::new(admin)
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let created: Vec<_> = records
        .iter()
        .filter(|r| r.target == "credential/dash" && r.method.is_empty())
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].kind, "issued");
    assert_eq!(created[0].actor, "admin/admin");
    assert_eq!(created[0].serial, dash.serial);
}

#[tokio::test]
async fn revoking_a_credential_ends_its_open_watch_and_refuses_new_calls() {
    let server = TestServer::start().await;
    let viewer = create(&server, "dash", pb::CredentialRole::Viewer, None).await;
    let mut watch = DeviceServiceClient::new(channel(&server.admin_url, &viewer).await)
        .watch_devices(pb::WatchDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    // SYNCED arrives first: the watch is open.
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.r#type(), pb::device_event::Type::Synced);
    let revoked =
        CredentialServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
            .revoke_credential(pb::RevokeCredentialRequest {
                name: "dash".into(),
                reason: "left the team".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(revoked.revocation_reason, "left the team");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch ends at once")
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{}", ended.message());
    let status = DeviceServiceClient::new(channel(&server.admin_url, &viewer).await)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_renewed_credential_works_and_its_old_certificate_is_superseded_once_the_new_is_used() {
    let server = TestServer::start().await;
    let old = create(&server, "ci", pb::CredentialRole::Operator, None).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_pem = csr(&key);
    let mut own = CredentialServiceClient::new(channel(&server.admin_url, &old).await);
    let renewed = own
        .renew_own_credential(pb::RenewOwnCredentialRequest {
            csr_pem: csr_pem.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // The same CSR again (a retry after a lost answer) gets the same certificate.
    let again = own
        .renew_own_credential(pb::RenewOwnCredentialRequest { csr_pem })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.certificate_pem, renewed.certificate_pem);
    let new = ClientCredentials {
        cert_pem: renewed.certificate_pem.clone(),
        key_pem: key.serialize_pem(),
        ..old.clone()
    };
    // Until the new certificate is used, the old one still works.
    DeviceServiceClient::new(channel(&server.admin_url, &old).await)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    DeviceServiceClient::new(channel(&server.admin_url, &new).await)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    wait_for(
        "the old certificate superseded",
        Duration::from_secs(10),
        || {
            let old = old.clone();
            let url = server.admin_url.clone();
            async move {
                let status = DeviceServiceClient::new(channel(&url, &old).await)
                    .list_devices(pb::ListDevicesRequest::default())
                    .await
                    .err()?;
                (status.code() == Code::Unauthenticated).then_some(())
            }
        },
    )
    .await;
    DeviceServiceClient::new(channel(&server.admin_url, &new).await)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    // Renewal with a key the credential already had is refused.
    let reused = CredentialServiceClient::new(channel(&server.admin_url, &new).await)
        .renew_own_credential(pb::RenewOwnCredentialRequest {
            csr_pem: csr(&rcgen::KeyPair::from_pem(&old.key_pem).unwrap()),
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");
}

#[tokio::test]
async fn the_last_admin_cannot_be_revoked_and_an_admin_certificate_can_be_revoked_by_serial() {
    let server = TestServer::start().await;
    let admin = channel(&server.admin_url, &server.admin_creds()).await;
    let refused = CredentialServiceClient::new(admin.clone())
        .revoke_credential(pb::RevokeCredentialRequest {
            name: "admin".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("last admin credential"),
        "{}",
        refused.message()
    );

    let second = create(&server, "root2", pb::CredentialRole::Admin, None).await;
    let operator = create(&server, "ops", pb::CredentialRole::Operator, None).await;
    let bootstrap_serial = CredentialServiceClient::new(admin.clone())
        .get_credential(pb::GetCredentialRequest {
            name: "admin".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .serial;
    // An operator may revoke device certificates, not credentials'.
    let status = CertificateServiceClient::new(channel(&server.admin_url, &operator).await)
        .revoke_certificate(pb::RevokeCertificateRequest {
            serial: bootstrap_serial.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let second = channel(&server.admin_url, &second).await;
    let revoked = CertificateServiceClient::new(second.clone())
        .revoke_certificate(pb::RevokeCertificateRequest {
            serial: bootstrap_serial.clone(),
            reason: "key leaked".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_serials;
    assert_eq!(revoked, [bootstrap_serial]);
    let status = DeviceServiceClient::new(admin)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Now root2 is the last admin with a valid certificate.
    let refused = CredentialServiceClient::new(second)
        .revoke_credential(pb::RevokeCredentialRequest {
            name: "root2".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
}

#[tokio::test]
async fn bad_credential_requests_are_refused_and_store_nothing() {
    use pb::CredentialRole as R;
    let server = TestServer::start().await;
    let mut client =
        CredentialServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let good_csr = csr(&rcgen::KeyPair::generate().unwrap());
    let request = |name: &str, role: i32| pb::CreateCredentialRequest {
        name: name.into(),
        role,
        csr_pem: good_csr.clone(),
        ..Default::default()
    };
    let cases: Vec<(pb::CreateCredentialRequest, Code, &str)> = vec![
        (
            pb::CreateCredentialRequest {
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                ..request("broken", R::Viewer as i32)
            },
            Code::InvalidArgument,
            "csr_pem",
        ),
        (request("nobody", 0), Code::InvalidArgument, "role"),
        (
            request("alien", 42),
            Code::InvalidArgument,
            "unknown role 42",
        ),
        (
            request("Bad Name!", R::Viewer as i32),
            Code::InvalidArgument,
            "name",
        ),
        (
            pb::CreateCredentialRequest {
                scope: "site in (a".into(),
                ..request("scoped", R::Operator as i32)
            },
            Code::InvalidArgument,
            "scope",
        ),
        (
            pb::CreateCredentialRequest {
                scope: "site=a".into(),
                ..request("root3", R::Admin as i32)
            },
            Code::InvalidArgument,
            "admin and enrollment credentials take no scope",
        ),
        (
            request("lonely", R::Service as i32),
            Code::InvalidArgument,
            "grant",
        ),
        (
            pb::CreateCredentialRequest {
                grant: Some(pb::ServiceGrant {
                    acts_as: 0,
                    methods: vec!["CredentialService/CreateCredential".into()],
                }),
                ..request("sneaky", R::Service as i32)
            },
            Code::InvalidArgument,
            "only admin credentials",
        ),
        (
            pb::CreateCredentialRequest {
                grant: Some(pb::ServiceGrant {
                    acts_as: 0,
                    methods: vec!["DeviceService/Nope".into()],
                }),
                ..request("typo", R::Service as i32)
            },
            Code::InvalidArgument,
            "not an admin API method",
        ),
        (
            pb::CreateCredentialRequest {
                grant: Some(pb::ServiceGrant {
                    acts_as: R::Viewer as i32,
                    methods: vec![],
                }),
                ..request("viewer-with-grant", R::Viewer as i32)
            },
            Code::InvalidArgument,
            "only service credentials",
        ),
        (
            pb::CreateCredentialRequest {
                validity: "10y".into(),
                ..request("forever", R::Viewer as i32)
            },
            Code::InvalidArgument,
            "validity",
        ),
        (
            pb::CreateCredentialRequest {
                validity: "9000d".into(),
                ..request("forever", R::Viewer as i32)
            },
            Code::InvalidArgument,
            "at most 730d",
        ),
        (
            request("admin", R::Viewer as i32),
            Code::AlreadyExists,
            "already exists",
        ),
    ];
    for (request, code, needle) in cases {
        let name = request.name.clone();
        let status = client.create_credential(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: {}",
            status.message()
        );
    }
    let listed = client
        .list_credentials(pb::ListCredentialsRequest {
            include_revoked: true,
        })
        .await
        .unwrap()
        .into_inner()
        .credentials;
    // The bootstrap admin and the bootstrap enrollment credential.
    assert_eq!(listed.len(), 2, "nothing stored: {listed:?}");
    assert_eq!(
        listed.iter().find(|c| c.name == "admin").unwrap().role(),
        pb::CredentialRole::Admin,
        "admin unchanged"
    );
    let unknown = client
        .revoke_credential(pb::RevokeCredentialRequest {
            name: "missing".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

fn fleet(name: &str, selector: &str) -> pb::ApplyFleetRequest {
    pb::ApplyFleetRequest {
        name: name.into(),
        selector: selector.into(),
        template: Some(flotilla::proto::agent::v1::DeviceSpec {
            files: vec![flotilla::proto::agent::v1::FileSpec {
                path: "/etc/fleet.conf".into(),
                content: "x".into(),
                mode: 0o644,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates a credential with a scope.
async fn create_scoped(
    server: &TestServer,
    name: &str,
    role: pb::CredentialRole,
    scope: &str,
) -> ClientCredentials {
    create_with(server, name, role, None, scope).await
}

fn denied(status: tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    assert!(
        status
            .message()
            .contains("outside this credential's scope (site=a)"),
        "{what}: {}",
        status.message()
    );
}

#[tokio::test]
async fn a_scoped_operator_sees_and_changes_only_its_scope() {
    use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient;
    use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
    let server = TestServer::start().await;
    let labels = |site: &str| [("site".to_string(), site.to_string())].into();
    let (_, a_id) = server.enroll_device_with("dev-a", labels("a")).await;
    server.enroll_device_with("dev-b", labels("b")).await;
    let admin = channel(&server.admin_url, &server.admin_creds()).await;
    FleetServiceClient::new(admin.clone())
        .apply_fleet(fleet("fleet-b", "site=b"))
        .await
        .unwrap();
    let scoped = channel(
        &server.admin_url,
        &create_scoped(
            &server,
            "berlin-ops",
            pb::CredentialRole::Operator,
            "site=a",
        )
        .await,
    )
    .await;
    let mut devices = DeviceServiceClient::new(scoped.clone());

    // Reads are filtered.
    let listed = devices
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(
        listed.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["dev-a"]
    );
    let mut watch = devices
        .watch_devices(pb::WatchDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.device.unwrap().name, "dev-a");
    assert_eq!(
        watch.message().await.unwrap().unwrap().r#type(),
        pb::device_event::Type::Synced
    );
    let fleets = FleetServiceClient::new(scoped.clone())
        .list_fleets(pb::ListFleetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .fleets;
    assert!(
        fleets.is_empty(),
        "fleet-b reaches outside site=a: {fleets:?}"
    );
    let certificates = CertificateServiceClient::new(scoped.clone())
        .list_certificates(pb::ListCertificatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .certificates;
    assert!(certificates.iter().all(|c| c.device_id == a_id) && !certificates.is_empty());

    // Single reads and writes outside the scope are refused, naming it.
    denied(
        devices
            .get_device(pb::GetDeviceRequest {
                name: "dev-b".into(),
            })
            .await
            .unwrap_err(),
        "get",
    );
    denied(
        devices
            .label_device(pb::LabelDeviceRequest {
                name: "dev-b".into(),
                set: [("role".into(), "x".into())].into(),
                remove: vec![],
            })
            .await
            .unwrap_err(),
        "label outside",
    );
    denied(
        devices
            .label_device(pb::LabelDeviceRequest {
                name: "dev-a".into(),
                set: [("site".into(), "b".into())].into(),
                remove: vec![],
            })
            .await
            .unwrap_err(),
        "label out of the scope",
    );
    denied(
        devices
            .delete_device(pb::DeleteDeviceRequest {
                name: "dev-b".into(),
            })
            .await
            .unwrap_err(),
        "delete",
    );
    denied(
        CertificateServiceClient::new(scoped.clone())
            .revoke_certificate(pb::RevokeCertificateRequest {
                device: "dev-b".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        "revoke",
    );
    let mut fleets = FleetServiceClient::new(scoped.clone());
    denied(
        fleets
            .apply_fleet(fleet("kiosks", "role=kiosk"))
            .await
            .unwrap_err(),
        "fleet reaching outside",
    );
    denied(
        fleets
            .apply_fleet(fleet("fleet-b", "site=a"))
            .await
            .unwrap_err(),
        "taking over fleet-b",
    );
    denied(
        fleets
            .delete_fleet(pb::DeleteFleetRequest {
                name: "fleet-b".into(),
            })
            .await
            .unwrap_err(),
        "delete fleet",
    );

    // Inside the scope, it operates.
    devices
        .label_device(pb::LabelDeviceRequest {
            name: "dev-a".into(),
            set: [("role".into(), "kiosk".into())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
    fleets
        .apply_fleet(fleet("kiosks-a", "site=a,role=kiosk"))
        .await
        .unwrap();
    let fleets = FleetServiceClient::new(scoped.clone())
        .list_fleets(pb::ListFleetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .fleets;
    assert_eq!(fleets.len(), 1);

    // Enrollment requests: shown and decided by the labels the device would get.
    let key = rcgen::KeyPair::generate().unwrap();
    flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient::new(
        channel(&server.agent_url, &server.enrollment_creds()).await,
    )
    .enroll(support::enroll_request("dev-c", csr(&key)))
    .await
    .unwrap();
    let mut enrollments = EnrollmentServiceClient::new(scoped);
    let pending = enrollments
        .list_enrollments(pb::ListEnrollmentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .enrollments;
    assert!(
        pending.iter().all(|e| e.name != "dev-c"),
        "site=lab is outside site=a"
    );
    denied(
        enrollments
            .approve_enrollment(pb::ApproveEnrollmentRequest {
                name: "dev-c".into(),
                labels: Default::default(),
            })
            .await
            .unwrap_err(),
        "approve as site=lab",
    );
    enrollments
        .approve_enrollment(pb::ApproveEnrollmentRequest {
            name: "dev-c".into(),
            labels: labels("a").into_iter().collect(),
        })
        .await
        .unwrap();
}

/// Every record of the trail, with the audit key the server sent.
async fn trail(server: &TestServer, query: pb::ListAuditRequest) -> (Vec<pb::AuditRecord>, String) {
    let response = AuditServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .list_audit(query)
        .await
        .unwrap()
        .into_inner();
    (response.records, response.audit_public_key_pem)
}

fn sealed(record: &pb::AuditRecord) -> flotilla::audit::SealedRecord {
    let ms = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
            .unwrap_or(0)
    };
    flotilla::audit::SealedRecord {
        entry: flotilla::audit::AuditEntry {
            seq: record.seq,
            at_ms: ms(&record.at),
            kind: record.kind.clone(),
            device_id: record.device_id.clone(),
            serial: record.serial.clone(),
            key_fingerprint: record.key_fingerprint.clone(),
            not_before_ms: ms(&record.not_before),
            not_after_ms: ms(&record.not_after),
            actor: record.actor.clone(),
            reason: record.reason.clone(),
            proof: record.proof.clone(),
            outcome: record.outcome.clone(),
            target: record.target.clone(),
            role: record.role.clone(),
            method: record.method.clone(),
            revision: record.revision.clone(),
        },
        previous_hash: record.previous_hash.clone(),
        hash: record.hash.clone(),
        signature: record.signature.clone(),
    }
}

fn rollout_fleet(content: &str) -> pb::ApplyFleetRequest {
    let mut request = fleet("web", "role=web");
    request.template.as_mut().unwrap().files[0].content = content.into();
    request.rollout = Some(pb::RolloutPolicy {
        batches: vec![pb::RolloutBatch {
            count: 1,
            ..Default::default()
        }],
        success_threshold: 100,
        progress_deadline_seconds: 3600,
        max_unavailable: "1".into(),
        ..Default::default()
    });
    request
}

#[tokio::test]
async fn every_mutating_call_leaves_one_record_naming_actor_method_and_target() {
    use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient;
    use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
    use flotilla::proto::admin::v1::rollout_service_client::RolloutServiceClient;
    use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient as Enroll;
    let server = TestServer::start().await;
    let admin = channel(&server.admin_url, &server.admin_creds()).await;
    let mut devices = DeviceServiceClient::new(admin.clone());
    let mut fleets = FleetServiceClient::new(admin.clone());
    let mut rollouts = RolloutServiceClient::new(admin.clone());
    let mut certificates = CertificateServiceClient::new(admin.clone());
    let mut credentials = CredentialServiceClient::new(admin.clone());
    let mut enrollments = EnrollmentServiceClient::new(admin.clone());
    let mut enroll = Enroll::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    for name in ["web-0", "stranger"] {
        let key = rcgen::KeyPair::generate().unwrap();
        enroll
            .enroll(support::enroll_request(name, csr(&key)))
            .await
            .unwrap();
    }
    let before = trail(&server, Default::default()).await.0.len();

    // (method, target, revision it must name, or "" when none is checked)
    let mut expected: Vec<(&str, String, String)> = Vec::new();
    let approved = enrollments
        .approve_enrollment(pb::ApproveEnrollmentRequest {
            name: "web-0".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    let serial = certificates
        .list_certificates(pb::ListCertificatesRequest {
            device: "web-0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .certificates[0]
        .serial
        .clone();
    assert!(!approved.device_id.is_empty());
    expected.push((
        "EnrollmentService/ApproveEnrollment",
        "enrollment/web-0".into(),
        serial.clone(),
    ));
    enrollments
        .deny_enrollment(pb::DenyEnrollmentRequest {
            name: "stranger".into(),
            reason: "unknown hardware".into(),
        })
        .await
        .unwrap();
    expected.push((
        "EnrollmentService/DenyEnrollment",
        "enrollment/stranger".into(),
        String::new(),
    ));
    let applied = fleets
        .apply_fleet(rollout_fleet("v1"))
        .await
        .unwrap()
        .into_inner();
    expected.push((
        "FleetService/ApplyFleet",
        "fleet/web".into(),
        applied.revision.to_string(),
    ));
    let applied = fleets
        .apply_fleet(rollout_fleet("v2"))
        .await
        .unwrap()
        .into_inner();
    expected.push((
        "FleetService/ApplyFleet",
        "fleet/web".into(),
        applied.revision.to_string(),
    ));
    let request = || pb::RolloutRequest {
        fleet: "web".into(),
        ..Default::default()
    };
    rollouts.pause_rollout(request()).await.unwrap();
    expected.push((
        "RolloutService/PauseRollout",
        "fleet/web".into(),
        "2".into(),
    ));
    rollouts.resume_rollout(request()).await.unwrap();
    expected.push((
        "RolloutService/ResumeRollout",
        "fleet/web".into(),
        "2".into(),
    ));
    rollouts.rollback_rollout(request()).await.unwrap();
    expected.push((
        "RolloutService/RollbackRollout",
        "fleet/web".into(),
        "3".into(),
    ));
    let device = devices
        .apply_device(pb::ApplyDeviceRequest {
            name: "web-0".into(),
            spec: Some(Default::default()),
            labels: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!device.name.is_empty());
    expected.push((
        "DeviceService/ApplyDevice",
        "device/web-0".into(),
        String::new(),
    ));
    devices
        .label_device(pb::LabelDeviceRequest {
            name: "web-0".into(),
            set: [("site".to_string(), "berlin".to_string())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
    expected.push((
        "DeviceService/LabelDevice",
        "device/web-0".into(),
        String::new(),
    ));
    certificates
        .renew_certificate(pb::RenewCertificateRequest {
            selector: "role=web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    expected.push((
        "CertificateService/RenewCertificate",
        "selector/role=web".into(),
        String::new(),
    ));
    certificates
        .revoke_certificate(pb::RevokeCertificateRequest {
            serial: serial.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    expected.push((
        "CertificateService/RevokeCertificate",
        "device/web-0".into(),
        String::new(),
    ));
    devices
        .delete_device(pb::DeleteDeviceRequest {
            name: "web-0".into(),
        })
        .await
        .unwrap();
    expected.push((
        "DeviceService/DeleteDevice",
        "device/web-0".into(),
        String::new(),
    ));
    fleets
        .delete_fleet(pb::DeleteFleetRequest { name: "web".into() })
        .await
        .unwrap();
    expected.push((
        "FleetService/DeleteFleet",
        "fleet/web".into(),
        String::new(),
    ));
    let key = rcgen::KeyPair::generate().unwrap();
    let created = credentials
        .create_credential(pb::CreateCredentialRequest {
            name: "ops".into(),
            role: pb::CredentialRole::Operator as i32,
            csr_pem: csr(&key),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    expected.push((
        "CredentialService/CreateCredential",
        "credential/ops".into(),
        created.credential.unwrap().serial,
    ));
    let renewed = credentials
        .renew_credential(pb::RenewCredentialRequest {
            name: "ops".into(),
            csr_pem: csr(&rcgen::KeyPair::generate().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    expected.push((
        "CredentialService/RenewCredential",
        "credential/ops".into(),
        renewed.credential.unwrap().serial,
    ));
    credentials
        .revoke_credential(pb::RevokeCredentialRequest {
            name: "ops".into(),
            reason: "left the team".into(),
        })
        .await
        .unwrap();
    expected.push((
        "CredentialService/RevokeCredential",
        "credential/ops".into(),
        String::new(),
    ));

    let (records, key_pem) = trail(&server, Default::default()).await;
    let calls: Vec<&pb::AuditRecord> = records
        .iter()
        .skip(before)
        .filter(|r| !r.method.is_empty())
        .collect();
    assert_eq!(
        calls.len(),
        expected.len(),
        "one record per call: {calls:#?}"
    );
    for ((method, target, revision), record) in expected.iter().zip(&calls) {
        assert_eq!(&record.method, method);
        assert_eq!(&record.target, target, "{method}");
        assert_eq!(record.actor, "admin/admin", "{method}");
        assert_eq!(record.role, "admin", "{method}");
        assert_eq!(record.outcome, "ok", "{method}");
        if !revision.is_empty() {
            assert_eq!(&record.revision, revision, "{method}");
        }
    }
    let denied = calls.iter().find(|r| r.kind == "deny").unwrap();
    assert_eq!(denied.reason, "unknown hardware");
    let labeled = calls.iter().find(|r| r.kind == "label").unwrap();
    assert_eq!(labeled.reason, "set site=berlin");
    // The device's certificate events name it while it exists; the whole trail verifies.
    let spki = flotilla::signature::spki_der_from_pem(&key_pem).unwrap();
    let all: Vec<_> = records.iter().map(sealed).collect();
    assert_eq!(
        flotilla::audit::verify_chain(&all, &spki),
        Ok(records.len())
    );

    // Filters: by target (a device's name selects its certificate events too), actor, kind.
    let (by_target, _) = trail(
        &server,
        pb::ListAuditRequest {
            target: "fleet/web".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_target.len(), 6);
    assert!(by_target.iter().all(|r| r.target == "fleet/web"));
    let (by_kind, _) = trail(
        &server,
        pb::ListAuditRequest {
            kind: "apply".into(),
            actor: "admin".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_kind.len(), 3, "two fleet applies and one device apply");
    let (nobody, _) = trail(
        &server,
        pb::ListAuditRequest {
            actor: "operator/admin".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(nobody.is_empty());
}

#[tokio::test]
async fn refused_writes_are_recorded_with_who_tried_and_why() {
    use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
    let server = TestServer::start().await;
    server
        .enroll_device_with("dev-b", [("site".to_string(), "b".to_string())].into())
        .await;
    let viewer = create(&server, "dash", pb::CredentialRole::Viewer, None).await;
    let viewer = channel(&server.admin_url, &viewer).await;
    let refused = FleetServiceClient::new(viewer.clone())
        .apply_fleet(fleet("web", "role=web"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // A refused read is not a change: no record.
    CredentialServiceClient::new(viewer)
        .list_credentials(pb::ListCredentialsRequest::default())
        .await
        .unwrap_err();
    let scoped = create_scoped(&server, "ops-a", pb::CredentialRole::Operator, "site=a").await;
    let outside = DeviceServiceClient::new(channel(&server.admin_url, &scoped).await)
        .label_device(pb::LabelDeviceRequest {
            name: "dev-b".into(),
            set: [("x".to_string(), "y".to_string())].into(),
            remove: vec![],
        })
        .await
        .unwrap_err();
    denied(outside, "label outside the scope");

    let (records, _) = trail(
        &server,
        pb::ListAuditRequest {
            kind: String::new(),
            ..Default::default()
        },
    )
    .await;
    let refusals: Vec<&pb::AuditRecord> =
        records.iter().filter(|r| r.outcome == "refused").collect();
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    assert_eq!(refusals[0].actor, "viewer/dash");
    assert_eq!(refusals[0].role, "viewer");
    assert_eq!(refusals[0].method, "FleetService/ApplyFleet");
    assert_eq!(refusals[0].kind, "apply");
    assert!(
        refusals[0].reason.contains("viewers read and watch only"),
        "{}",
        refusals[0].reason
    );
    assert_eq!(refusals[1].actor, "operator/ops-a");
    assert_eq!(refusals[1].method, "DeviceService/LabelDevice");
    assert!(
        refusals[1]
            .reason
            .contains("outside this credential's scope"),
        "{}",
        refusals[1].reason
    );
}

#[tokio::test]
async fn the_head_is_signed_on_demand_and_periodically() {
    use flotilla::control::Policy;
    let server = TestServer::start_with(Policy {
        audit_head_interval: Duration::from_millis(200),
        ..Policy::default()
    })
    .await;
    server.enroll_device("dev").await;
    let mut audit =
        AuditServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let (records, key_pem) = trail(&server, Default::default()).await;
    let spki = flotilla::signature::spki_der_from_pem(&key_pem).unwrap();
    let sealed: Vec<_> = records.iter().map(sealed).collect();
    let to_head = |h: pb::AuditHead| flotilla::audit::SignedHead {
        seq: h.seq,
        hash: h.hash,
        at_ms: h
            .at
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
            .unwrap(),
        signature: h.signature,
    };
    let head = to_head(
        audit
            .get_audit_head(pb::GetAuditHeadRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(head.seq, records.len() as i64);
    assert_eq!(flotilla::audit::check_head(&sealed, &head, &spki), Ok(()));
    let error = flotilla::audit::check_head(&sealed[..sealed.len() - 1], &head, &spki).unwrap_err();
    assert!(
        error.problem.contains("newest records were deleted"),
        "{error}"
    );

    let newest = records.len() as i64;
    let kept = wait_for("the newest head kept", Duration::from_secs(10), || {
        let mut audit = audit.clone();
        async move {
            let heads = audit
                .list_audit_heads(pb::ListAuditHeadsRequest { limit: 10 })
                .await
                .unwrap()
                .into_inner()
                .heads;
            heads.into_iter().next().filter(|h| h.seq == newest)
        }
    })
    .await;
    let kept = to_head(kept);
    assert_eq!(kept.seq, records.len() as i64);
    assert_eq!(flotilla::audit::check_head(&sealed, &kept, &spki), Ok(()));
}

#[tokio::test]
async fn enrollment_credentials_stamp_labels_approve_and_a_leaked_one_is_revoked_alone() {
    use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient;
    use flotilla::proto::agent::v1 as agent;
    use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient as Enroll;
    let server = TestServer::start().await;
    let admin = channel(&server.admin_url, &server.admin_creds()).await;
    let mut credentials = CredentialServiceClient::new(admin.clone());
    // The shared bootstrap enrollment credential is one credential among others.
    let listed = credentials
        .list_credentials(pb::ListCredentialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .credentials;
    let bootstrap = listed
        .iter()
        .find(|c| c.role == pb::CredentialRole::Enrollment as i32)
        .expect("the bootstrap enrollment credential is listed");
    assert_eq!(bootstrap.created_by, "bootstrap");

    let key = rcgen::KeyPair::generate().unwrap();
    let issued = credentials
        .create_credential(pb::CreateCredentialRequest {
            name: "factory-a".into(),
            role: pb::CredentialRole::Enrollment as i32,
            csr_pem: csr(&key),
            enrollment: Some(pb::EnrollmentPolicy {
                labels: [("site".to_string(), "factory-a".to_string())].into(),
                auto_approve: true,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let policy = issued
        .credential
        .as_ref()
        .unwrap()
        .enrollment
        .clone()
        .unwrap();
    assert!(policy.auto_approve);
    let factory = ClientCredentials {
        ca_pem: issued.ca_pem.clone(),
        cert_pem: issued.certificate_pem.clone(),
        key_pem: key.serialize_pem(),
        server_name: "localhost".into(),
    };
    // A device enrolled with it: approved at once, with the credential's labels over its own.
    let device_key = rcgen::KeyPair::generate().unwrap();
    let mut request = support::enroll_request("line-1", csr(&device_key));
    request.labels = [("site".to_string(), "elsewhere".to_string())].into();
    let response = Enroll::new(channel(&server.agent_url, &factory).await)
        .enroll(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.state(), agent::EnrollmentState::Approved);
    let mut enrollments = EnrollmentServiceClient::new(admin.clone());
    let record = enrollments
        .get_enrollment(pb::GetEnrollmentRequest {
            name: "line-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.credential, "factory-a");
    assert!(
        record.source_address.starts_with("127.0.0.1:"),
        "{}",
        record.source_address
    );
    assert_eq!(record.labels["site"], "factory-a");
    assert_eq!(record.decided_by, "enrollment/factory-a");
    let device_creds = ClientCredentials {
        ca_pem: issued.ca_pem.clone(),
        cert_pem: response.certificate_pem.clone(),
        key_pem: device_key.serialize_pem(),
        server_name: "localhost".into(),
    };

    // The shared credential's requests wait for an operator and say where they came from.
    let pending = Enroll::new(channel(&server.agent_url, &server.enrollment_creds()).await)
        .enroll(support::enroll_request(
            "manual-1",
            csr(&rcgen::KeyPair::generate().unwrap()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.state(), agent::EnrollmentState::Pending);
    let manual = enrollments
        .get_enrollment(pb::GetEnrollmentRequest {
            name: "manual-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(manual.credential, bootstrap.name);

    // The factory credential leaks: revoked, it enrolls nothing more...
    credentials
        .revoke_credential(pb::RevokeCredentialRequest {
            name: "factory-a".into(),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let refused = Enroll::new(channel(&server.agent_url, &factory).await)
        .enroll(support::enroll_request(
            "line-2",
            csr(&rcgen::KeyPair::generate().unwrap()),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        enrollments
            .get_enrollment(pb::GetEnrollmentRequest {
                name: "line-2".into()
            })
            .await
            .is_err(),
        "nothing stored"
    );
    // ...while the device it enrolled keeps working, and the shared credential too.
    assert!(
        support::sim::RawSession::open(&server.agent_url, &device_creds, &response.device_id)
            .await
            .is_ok()
    );
    Enroll::new(channel(&server.agent_url, &server.enrollment_creds()).await)
        .enroll(support::enroll_request(
            "manual-2",
            csr(&rcgen::KeyPair::generate().unwrap()),
        ))
        .await
        .unwrap();

    // A denied name is freed by deleting its request; an approved one is not deleted this way.
    enrollments
        .deny_enrollment(pb::DenyEnrollmentRequest {
            name: "manual-1".into(),
            reason: "unknown".into(),
        })
        .await
        .unwrap();
    enrollments
        .delete_enrollment(pb::DeleteEnrollmentRequest {
            name: "manual-1".into(),
        })
        .await
        .unwrap();
    let gone = enrollments
        .get_enrollment(pb::GetEnrollmentRequest {
            name: "manual-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let approved = enrollments
        .delete_enrollment(pb::DeleteEnrollmentRequest {
            name: "line-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(approved.code(), Code::FailedPrecondition);
    assert!(approved.message().contains("delete the device instead"));

    // Bad policies are refused and store nothing.
    let bad = credentials
        .create_credential(pb::CreateCredentialRequest {
            name: "ops-with-labels".into(),
            role: pb::CredentialRole::Operator as i32,
            csr_pem: csr(&rcgen::KeyPair::generate().unwrap()),
            enrollment: Some(pb::EnrollmentPolicy {
                labels: Default::default(),
                auto_approve: true,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("only enrollment credentials"),
        "{}",
        bad.message()
    );
}
