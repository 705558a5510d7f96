//! Fleets through the admin API over real mTLS: membership and conflicts, render failures, device
//! overrides, and refusals of bad input that store nothing. SQLite, or PostgreSQL with
//! FLOTILLA_TEST_DATABASE_URL.

use crate::support;

use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::proto::agent::v1 as agent;
use std::collections::BTreeMap;
use support::{TestServer, channel};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn fleet(name: &str, selector: &str, content: &str) -> admin::ApplyFleetRequest {
    admin::ApplyFleetRequest {
        name: name.into(),
        selector: selector.into(),
        label_defaults: Default::default(),
        template: Some(agent::DeviceSpec {
            files: vec![agent::FileSpec {
                path: "/etc/fleet.conf".into(),
                content: content.into(),
                mode: 0o644,
                ..Default::default()
            }],
            ..Default::default()
        }),
        rollout: None,
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn clients(
    server: &TestServer,
) -> (FleetServiceClient<Channel>, DeviceServiceClient<Channel>) {
    let channel = channel(&server.admin_url, &server.admin_creds()).await;
    (
        FleetServiceClient::new(channel.clone()),
        DeviceServiceClient::new(channel),
    )
}

async fn device(devices: &mut DeviceServiceClient<Channel>, name: &str) -> admin::Device {
    devices
        .get_device(admin::GetDeviceRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

fn rendered_content(device: &admin::Device, path: &str) -> Option<String> {
    device
        .rendered_spec
        .as_ref()?
        .files
        .iter()
        .find(|f| f.path == path)
        .map(|f| f.content.clone())
}

#[tokio::test]
async fn a_device_matched_by_two_fleets_keeps_its_owner_and_both_report_the_conflict() {
    let server = TestServer::start().await;
    let (mut fleets, mut devices) = clients(&server).await;
    server
        .enroll_device_with("gw", labels(&[("role", "web")]))
        .await;
    fleets
        .apply_fleet(fleet("web", "role=web", "web"))
        .await
        .unwrap();
    assert_eq!(device(&mut devices, "gw").await.fleet, "web");

    // The enrollment labels include site=lab, so this selector matches too.
    let lab = fleets
        .apply_fleet(fleet("lab", "site=lab", "lab"))
        .await
        .unwrap()
        .into_inner();
    let gw = device(&mut devices, "gw").await;
    assert_eq!(gw.fleet, "web", "keeps its current owner");
    assert_eq!(gw.conflicting_fleets, ["lab", "web"]);
    assert_eq!(
        rendered_content(&gw, "/etc/fleet.conf").as_deref(),
        Some("web")
    );
    let conflicts = lab.status.unwrap().conflicts;
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].device, "gw");
    let web = fleets
        .get_fleet(admin::GetFleetRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(web.status.unwrap().conflicts.len(), 1);

    // A new device that both match is not guessed into either.
    server
        .enroll_device_with("gw-2", labels(&[("role", "web")]))
        .await;
    let gw2 = device(&mut devices, "gw-2").await;
    assert_eq!(gw2.fleet, "");
    assert_eq!(gw2.conflicting_fleets, ["lab", "web"]);

    // Deleting one fleet resolves the conflict: the other owns both.
    fleets
        .delete_fleet(admin::DeleteFleetRequest { name: "web".into() })
        .await
        .unwrap();
    for name in ["gw", "gw-2"] {
        let d = device(&mut devices, name).await;
        assert_eq!(d.fleet, "lab", "{name}");
        assert!(d.conflicting_fleets.is_empty());
        assert_eq!(
            rendered_content(&d, "/etc/fleet.conf").as_deref(),
            Some("lab")
        );
    }
}

#[tokio::test]
async fn a_template_a_device_cannot_render_fails_that_device_only() {
    let server = TestServer::start().await;
    let (mut fleets, mut devices) = clients(&server).await;
    server
        .enroll_device_with("with-rack", labels(&[("role", "web"), ("rack", "r7")]))
        .await;
    server
        .enroll_device_with("no-rack", labels(&[("role", "web")]))
        .await;
    fleets
        .apply_fleet(fleet("web", "role=web", "first"))
        .await
        .unwrap();
    let applied = fleets
        .apply_fleet(fleet("web", "role=web", "rack {{ device.labels.rack }}"))
        .await
        .unwrap()
        .into_inner();
    let failures = applied.status.unwrap().render_failures;
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].device, "no-rack");
    assert!(
        failures[0].reason.contains("template.files[0].content"),
        "{}",
        failures[0].reason
    );

    let good = device(&mut devices, "with-rack").await;
    assert_eq!(
        rendered_content(&good, "/etc/fleet.conf").as_deref(),
        Some("rack r7")
    );
    let bad = device(&mut devices, "no-rack").await;
    let status = bad.status.clone().unwrap();
    assert!(
        status.render_error.contains("undefined"),
        "{}",
        status.render_error
    );
    assert_eq!(
        rendered_content(&bad, "/etc/fleet.conf").as_deref(),
        Some("first"),
        "keeps its last good spec"
    );

    // A default for the missing label fixes it.
    let mut fixed = fleet("web", "role=web", "rack {{ device.labels.rack }}");
    fixed.label_defaults = [("rack".to_string(), "none".to_string())].into();
    let fixed = fleets.apply_fleet(fixed).await.unwrap().into_inner();
    assert!(fixed.status.unwrap().render_failures.is_empty());
    let bad = device(&mut devices, "no-rack").await;
    assert_eq!(bad.status.clone().unwrap().render_error, "");
    assert_eq!(
        rendered_content(&bad, "/etc/fleet.conf").as_deref(),
        Some("rack none")
    );
}

#[tokio::test]
async fn device_overrides_beat_the_template_and_labels_move_devices() {
    let server = TestServer::start().await;
    let (mut fleets, mut devices) = clients(&server).await;
    server
        .enroll_device_with("mover", labels(&[("role", "web")]))
        .await;
    fleets
        .apply_fleet(fleet("web", "role=web", "web"))
        .await
        .unwrap();
    fleets
        .apply_fleet(fleet("db", "role=db", "db"))
        .await
        .unwrap();
    devices
        .apply_device(admin::ApplyDeviceRequest {
            name: "mover".into(),
            spec: Some(agent::DeviceSpec {
                files: vec![
                    agent::FileSpec {
                        path: "/etc/fleet.conf".into(),
                        content: "mine".into(),
                        ..Default::default()
                    },
                    agent::FileSpec {
                        path: "/etc/extra".into(),
                        content: "extra".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            labels: None,
        })
        .await
        .unwrap();
    let d = device(&mut devices, "mover").await;
    assert_eq!(
        rendered_content(&d, "/etc/fleet.conf").as_deref(),
        Some("mine")
    );
    assert_eq!(rendered_content(&d, "/etc/extra").as_deref(), Some("extra"));

    let moved = devices
        .label_device(admin::LabelDeviceRequest {
            name: "mover".into(),
            set: [("role".to_string(), "db".to_string())].into(),
            remove: vec!["site".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.fleet, "db");
    assert!(!moved.labels.contains_key("site"));
    let listed = devices
        .list_devices(admin::ListDevicesRequest {
            selector: "role=db,!site".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(listed.len(), 1);
    let db = fleets
        .get_fleet(admin::GetFleetRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(db.status.unwrap().devices, ["mover"]);
    let revisions = fleets
        .list_fleet_revisions(admin::ListFleetRevisionsRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner()
        .revisions;
    assert_eq!(revisions.len(), 1);
    assert_eq!(revisions[0].created_by, "admin/admin");
}

fn field_of(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations[0].field.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn bad_fleets_selectors_and_labels_are_refused_and_store_nothing() {
    let server = TestServer::start().await;
    let (mut fleets, mut devices) = clients(&server).await;
    server.enroll_device("plain").await;
    let mut bad_defaults = fleet("ok", "role=web", "x");
    bad_defaults.label_defaults = [("bad key!".to_string(), "x".to_string())].into();
    let mut static_bad_path = fleet("ok", "role=web", "x");
    static_bad_path.template.as_mut().unwrap().files[0].path = "relative".into();
    for (request, field) in [
        (fleet("Bad_Name", "role=web", "x"), "name"),
        (fleet("ok", "role in (web", "x"), "selector"),
        (
            fleet("ok", "role=web", "{{ unclosed"),
            "template.files[0].content",
        ),
        // 47 bytes that would take hundreds of MiB per device: refused before any render.
        (
            fleet("ok", "role=web", r#"{% set a="x"*50000000 %}{{a~a~a~a}}"#),
            "template.files[0].content",
        ),
        (
            fleet(
                "ok",
                "role=web",
                r#"{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"#,
            ),
            "template.files[0].content",
        ),
        (
            fleet("ok", "role=web", "{% macro m() %}{% endmacro %}"),
            "template.files[0].content",
        ),
        (bad_defaults, "defaults.labels"),
        (static_bad_path, "template.files[0].path"),
    ] {
        let status = fleets.apply_fleet(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert_eq!(field_of(&status), field, "{}", status.message());
    }
    let listed = fleets
        .list_fleets(admin::ListFleetsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.fleets.is_empty(), "nothing stored");

    let missing = fleets
        .get_fleet(admin::GetFleetRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = fleets
        .delete_fleet(admin::DeleteFleetRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let bad_selector = devices
        .list_devices(admin::ListDevicesRequest {
            selector: "site=".into(),
            ..Default::default()
        })
        .await;
    assert!(bad_selector.is_ok(), "an empty value is a valid selector");
    let bad_selector = devices
        .list_devices(admin::ListDevicesRequest {
            selector: "site==>x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_selector.code(), Code::InvalidArgument);
    assert!(
        bad_selector.message().contains("at character"),
        "{}",
        bad_selector.message()
    );

    let unknown = devices
        .label_device(admin::LabelDeviceRequest {
            name: "ghost".into(),
            set: [("a".to_string(), "b".to_string())].into(),
            remove: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let both = devices
        .label_device(admin::LabelDeviceRequest {
            name: "plain".into(),
            set: [("a".to_string(), "b".to_string())].into(),
            remove: vec!["a".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);
    assert_eq!(
        device(&mut devices, "plain").await.labels,
        labels(&[("site", "lab")]).into_iter().collect()
    );
}
