//! The gRPC API over real mTLS on loopback: who is refused, with which code, and what bad input does
//! (and does not) leave behind. Runs on SQLite, or PostgreSQL with FLOTILLA_TEST_DATABASE_URL.

use crate::support;

use flotilla::client::ClientCredentials;
use flotilla::identity::{Identity, Role};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient as AdminEnrollmentClient;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use std::time::Duration;
use support::{TestServer, channel, csr, enroll_request};
use tonic::Code;
use tonic_types::StatusExt;

fn hello(device_id: &str) -> agent::AgentMessage {
    agent::AgentMessage {
        kind: Some(agent::agent_message::Kind::Hello(agent::Hello {
            device_id: device_id.into(),
            ..Default::default()
        })),
    }
}

async fn open_session(
    url: &str,
    creds: &ClientCredentials,
    device_id: &str,
) -> Result<tonic::Streaming<agent::ServerMessage>, tonic::Status> {
    let mut client = AgentServiceClient::new(channel(url, creds).await);
    let outbound = tokio_stream::iter(vec![hello(device_id)]).chain(tokio_stream::pending());
    Ok(client.session(outbound).await?.into_inner())
}

use tokio_stream::StreamExt;

#[tokio::test]
async fn a_certificate_from_another_ca_is_unauthenticated() {
    let server = TestServer::start().await;
    let (other_ca, _) =
        flotilla::ca::CertificateAuthority::generate("other", Duration::from_secs(3600)).unwrap();
    let (issued, key) = other_ca
        .issue_with_new_key(&flotilla::ca::Subject {
            common_name: "admin".into(),
            identity: Some(Identity::new(Role::Admin, "admin")),
            dns_names: vec![],
            ip_addresses: vec![],
            usage: flotilla::ca::Usage::Client,
            validity: Duration::from_secs(3600),
        })
        .unwrap();
    let creds = ClientCredentials {
        ca_pem: server.ca_pem(),
        cert_pem: issued.pem,
        key_pem: key,
        server_name: "localhost".into(),
    };
    let status = DeviceServiceClient::new(channel(&server.admin_url, &creds).await)
        .list_devices(admin::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("certificate rejected"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn the_enrollment_credential_cannot_open_a_management_stream() {
    let server = TestServer::start().await;
    let status = open_session(&server.agent_url, &server.enrollment_creds(), "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("enrollment credentials may not call"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_device_cannot_use_the_admin_api_or_another_devices_stream() {
    let server = TestServer::start().await;
    let (creds, device_id) = server.enroll_device("dev-a").await;
    let (_, other_id) = server.enroll_device("dev-b").await;

    let status = DeviceServiceClient::new(channel(&server.admin_url, &creds).await)
        .get_device(admin::GetDeviceRequest {
            name: "dev-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let status = open_session(&server.agent_url, &creds, &other_id)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains(&other_id), "{}", status.message());

    // Its own stream works, and the first message is the acceptance.
    let mut stream = open_session(&server.agent_url, &creds, &device_id)
        .await
        .unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(agent::server_message::Kind::Accepted(_))
    ));
}

#[tokio::test]
async fn unapproved_and_denied_enrollments_get_no_certificate() {
    let server = TestServer::start().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let pending = enroll
        .enroll(enroll_request("dev-x", csr(&key)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.state(), agent::EnrollmentState::Pending);
    assert!(pending.certificate_pem.is_empty());

    let mut admin_client =
        AdminEnrollmentClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    admin_client
        .deny_enrollment(admin::DenyEnrollmentRequest {
            name: "dev-x".into(),
            reason: "unknown hardware".into(),
        })
        .await
        .unwrap();
    let denied = enroll
        .enroll(enroll_request("dev-x", csr(&key)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.state(), agent::EnrollmentState::Denied);
    assert_eq!(denied.reason, "unknown hardware");
    assert!(denied.certificate_pem.is_empty());

    let status = admin_client
        .approve_enrollment(admin::ApproveEnrollmentRequest {
            name: "dev-x".into(),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("already denied"),
        "{}",
        status.message()
    );

    // Another key asking for the same name is refused rather than confused with the first.
    let other = rcgen::KeyPair::generate().unwrap();
    let status = enroll
        .enroll(enroll_request("dev-x", csr(&other)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn enrollment_is_idempotent_for_the_same_key() {
    let server = TestServer::start().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let (creds, device_id) = {
        let mut enroll = EnrollmentServiceClient::new(
            channel(&server.agent_url, &server.enrollment_creds()).await,
        );
        enroll
            .enroll(enroll_request("dev-i", csr(&key)))
            .await
            .unwrap();
        AdminEnrollmentClient::new(channel(&server.admin_url, &server.admin_creds()).await)
            .approve_enrollment(admin::ApproveEnrollmentRequest {
                name: "dev-i".into(),
                labels: Default::default(),
            })
            .await
            .unwrap();
        let first = enroll
            .enroll(enroll_request("dev-i", csr(&key)))
            .await
            .unwrap()
            .into_inner();
        let again = enroll
            .enroll(enroll_request("dev-i", csr(&key)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            first.certificate_pem, again.certificate_pem,
            "no second certificate"
        );
        (first.certificate_pem, first.device_id)
    };
    let issued = flotilla::pki::identity_pem(&creds).unwrap();
    assert_eq!(issued, Identity::new(Role::Device, device_id));
}

#[tokio::test]
async fn an_invalid_csr_is_refused_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let status = enroll
            .enroll(enroll_request("dev-bad", garbage.into()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{garbage:?}");
        assert!(
            status.message().starts_with("csr_pem:"),
            "{}",
            status.message()
        );
    }
    let listed =
        AdminEnrollmentClient::new(channel(&server.admin_url, &server.admin_creds()).await)
            .list_enrollments(admin::ListEnrollmentsRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(listed.enrollments.is_empty());
}

fn file(path: &str, content: &str) -> agent::FileSpec {
    agent::FileSpec {
        path: path.into(),
        content: content.into(),
        mode: 0o644,
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_device_specs_are_refused_with_the_field_and_change_nothing() {
    let server = TestServer::start().await;
    server.enroll_device("dev-s").await;
    let mut devices =
        DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let good = agent::DeviceSpec {
        files: vec![file("/etc/good", "ok")],
        ..Default::default()
    };
    devices
        .apply_device(admin::ApplyDeviceRequest {
            name: "dev-s".into(),
            spec: Some(good.clone()),
            labels: None,
        })
        .await
        .unwrap();

    for (bad_path, field) in [
        ("etc/relative", "spec.files[1].path"),
        ("/etc/../shadow", "spec.files[1].path"),
    ] {
        let status = devices
            .apply_device(admin::ApplyDeviceRequest {
                name: "dev-s".into(),
                spec: Some(agent::DeviceSpec {
                    files: vec![file("/etc/fine", "x"), file(bad_path, "x")],
                    ..Default::default()
                }),
                labels: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad_path}");
        let details = status.get_error_details();
        let violation = &details
            .bad_request()
            .expect("field details")
            .field_violations[0];
        assert_eq!(violation.field, field);
    }

    // Oversized: beyond the message limit (refused by the transport before decoding), and within
    // it but beyond the spec limit (refused by validation).
    for (size, code) in [
        (3 * 1024 * 1024, Code::OutOfRange),
        (1536 * 1024, Code::InvalidArgument),
    ] {
        let status = devices
            .apply_device(admin::ApplyDeviceRequest {
                name: "dev-s".into(),
                spec: Some(agent::DeviceSpec {
                    files: vec![file("/etc/big", &"x".repeat(size))],
                    ..Default::default()
                }),
                labels: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{size}: {}", status.message());
    }

    let stored = devices
        .get_device(admin::GetDeviceRequest {
            name: "dev-s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.spec.unwrap(), good, "nothing stored half-way");

    let status = devices
        .apply_device(admin::ApplyDeviceRequest {
            name: "no-such-device".into(),
            spec: Some(good),
            labels: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = devices
        .get_device(admin::GetDeviceRequest {
            name: "no-such-device".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("no-such-device"));
}

#[tokio::test]
async fn a_connected_device_receives_its_spec_and_acks_it() {
    let server = TestServer::start().await;
    let (creds, device_id) = server.enroll_device("dev-p").await;
    let mut client = AgentServiceClient::new(channel(&server.agent_url, &creds).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(&device_id)).await.unwrap();
    let mut stream = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.message().await.unwrap().unwrap().kind,
        Some(agent::server_message::Kind::Accepted(_))
    ));
    // The empty initial spec arrives first; acknowledge it.
    let Some(agent::server_message::Kind::Spec(initial)) =
        stream.message().await.unwrap().unwrap().kind
    else {
        panic!("expected the initial spec");
    };
    tx.send(agent::AgentMessage {
        kind: Some(agent::agent_message::Kind::Ack(agent::Ack {
            nonce: initial.nonce,
            version: initial.version,
        })),
    })
    .await
    .unwrap();

    let spec = agent::DeviceSpec {
        files: vec![file("/etc/motd", "hi")],
        ..Default::default()
    };
    DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .apply_device(admin::ApplyDeviceRequest {
            name: "dev-p".into(),
            spec: Some(spec.clone()),
            labels: None,
        })
        .await
        .unwrap();
    let Some(agent::server_message::Kind::Spec(push)) =
        stream.message().await.unwrap().unwrap().kind
    else {
        panic!("expected a spec push");
    };
    assert_eq!(push.spec.unwrap(), spec);
    tx.send(agent::AgentMessage {
        kind: Some(agent::agent_message::Kind::Ack(agent::Ack {
            nonce: push.nonce,
            version: push.version.clone(),
        })),
    })
    .await
    .unwrap();
    let control = server.control.clone();
    support::wait_for("SYNCED", Duration::from_secs(10), || {
        let control = control.clone();
        let version = push.version.clone();
        async move {
            let view = control.get_device("dev-p").await.ok()?;
            let status = view.status?;
            (status.state == flotilla::hub::SyncState::Synced
                && status.acked_version == Some(version))
            .then_some(())
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn large_device_lists_come_in_pages() {
    let server = TestServer::start().await;
    for i in 0..5 {
        server.enroll_device(&format!("dev-{i}")).await;
    }
    let mut devices =
        DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = devices
            .list_devices(admin::ListDevicesRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.devices.len() <= 2);
        seen.extend(page.devices.into_iter().map(|d| d.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4"]);
    // Without a page size: everything, no token.
    let all = devices
        .list_devices(admin::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.devices.len(), 5);
    assert!(all.next_page_token.is_empty());
}
