//! Device status through the real API: what an agent reports is kept, bounded and shown — system
//! info, resources and firing monitors become conditions and a summary, field selectors filter on
//! them, an out-of-bounds report is refused without ending the session, the report is written
//! behind and counted in metrics.

use crate::support;

use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::agent::v1 as agent;
use std::time::Duration;
use support::sim::RawSession;
use support::{TestServer, channel, http_body, wait_for};
use tonic::Code;

fn system_info(hostname: &str) -> agent::DeviceSystemInfo {
    agent::DeviceSystemInfo {
        hostname: hostname.into(),
        os_id: "debian".into(),
        os_version_id: "13".into(),
        os_pretty_name: "Debian GNU/Linux 13 (trixie)".into(),
        kernel_release: "6.12.0".into(),
        architecture: "aarch64".into(),
        cpu_count: 4,
        memory_total_bytes: 1 << 30,
        agent_version: "0.1.0".into(),
        ..Default::default()
    }
}

fn resources(alerts: Vec<agent::ResourceAlert>) -> agent::ResourceReport {
    agent::ResourceReport {
        usage: Some(agent::ResourceUsage {
            cpu_percent: 12,
            memory_total_bytes: 1 << 30,
            memory_used_bytes: 900 << 20,
            ..Default::default()
        }),
        alerts,
    }
}

fn memory_warning() -> agent::ResourceAlert {
    agent::ResourceAlert {
        monitor: "memory".into(),
        severity: agent::AlertSeverity::Warning as i32,
        percent: 88,
        threshold: 80,
        ..Default::default()
    }
}

fn report_of(
    info: Option<agent::DeviceSystemInfo>,
    report: Option<agent::ResourceReport>,
) -> agent::agent_message::Kind {
    agent::agent_message::Kind::Status(agent::Status {
        system_info: info,
        resources: report,
        ..Default::default()
    })
}

fn condition<'a>(device: &'a admin::Device, kind: &str) -> &'a admin::Condition {
    let status = device.status.as_ref().unwrap();
    status
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {:?}", status.conditions))
}

async fn names(
    devices: &mut DeviceServiceClient<tonic::transport::Channel>,
    fields: &str,
) -> Vec<String> {
    devices
        .list_devices(admin::ListDevicesRequest {
            field_selector: fields.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices
        .into_iter()
        .map(|d| d.name)
        .collect()
}

#[tokio::test]
async fn reports_become_conditions_are_bounded_filtered_persisted_and_counted() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let server = TestServer::start().await;
    let (creds, device_id) = server.enroll_device("edge-a").await;
    let (quiet_creds, quiet_id) = server.enroll_device("edge-quiet").await;
    let mut devices =
        DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);

    let mut session = RawSession::open(&server.agent_url, &creds, &device_id)
        .await
        .unwrap();
    session
        .next_matching(|k| matches!(k, agent::server_message::Kind::Accepted(_)).then_some(()))
        .await;
    // An agent that sends no status at all (an older agent) is still a healthy device.
    let mut quiet = RawSession::open(&server.agent_url, &quiet_creds, &quiet_id)
        .await
        .unwrap();
    quiet
        .next_matching(|k| matches!(k, agent::server_message::Kind::Accepted(_)).then_some(()))
        .await;

    session
        .send(report_of(
            Some(system_info("edge-a.lab")),
            Some(resources(vec![memory_warning()])),
        ))
        .await;
    let get = |devices: &mut DeviceServiceClient<_>| {
        let mut devices: DeviceServiceClient<tonic::transport::Channel> = devices.clone();
        async move {
            devices
                .get_device(admin::GetDeviceRequest {
                    name: "edge-a".into(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let device = wait_for("the report to arrive", Duration::from_secs(10), || {
        let fetch = get(&mut devices);
        async move {
            let device = fetch.await;
            let status = device.status.as_ref()?;
            (status.summary == admin::DeviceSummary::Degraded as i32).then_some(device)
        }
    })
    .await;
    let status = device.status.as_ref().unwrap();
    let info = status.system_info.as_ref().unwrap();
    assert_eq!(info.hostname, "edge-a.lab");
    assert_eq!(info.architecture, "aarch64");
    assert_eq!(status.resources.as_ref().unwrap().cpu_percent, 12);
    assert_eq!(status.alerts.len(), 1);
    let pressure = condition(&device, "ResourcePressure");
    assert_eq!(pressure.status, admin::ConditionStatus::True as i32);
    assert_eq!(pressure.reason, "Warning");
    assert_eq!(pressure.message, "memory 88% >= 80% (warning)");
    assert_eq!(
        condition(&device, "Online").status,
        admin::ConditionStatus::True as i32
    );

    // Field selectors on the status, on List and on Watch.
    for (fields, expect) in [
        ("status.summary=Degraded", "edge-a"),
        ("status.summary=Healthy", "edge-quiet"),
        ("status.arch=aarch64,status.os=debian", "edge-a"),
        ("status.arch!=aarch64", "edge-quiet"),
        ("status.agentVersion=0.1.0", "edge-a"),
    ] {
        assert_eq!(names(&mut devices, fields).await, [expect], "{fields}");
    }
    for (bad, expect) in [
        ("status.summary=Sad", "cannot be \"Sad\""),
        ("status.color=red", "unknown field \"status.color\""),
        ("status.summary", "is not field=value"),
    ] {
        let refused = devices
            .list_devices(admin::ListDevicesRequest {
                field_selector: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad}");
        assert!(
            refused.message().contains(expect),
            "{bad}: {}",
            refused.message()
        );
        let refused = devices
            .watch_devices(admin::WatchDevicesRequest {
                field_selector: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad}");
    }
    let mut watch = devices
        .watch_devices(admin::WatchDevicesRequest {
            field_selector: "status.summary=Degraded".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.device.unwrap().name, "edge-a");
    assert_eq!(
        watch.message().await.unwrap().unwrap().r#type,
        admin::device_event::Type::Synced as i32
    );

    // Out of bounds: refused with the reason, and the session goes on with the old report.
    let mut oversized = system_info(&"h".repeat(300));
    oversized.interfaces = Vec::new();
    session.send(report_of(Some(oversized), None)).await;
    let reason = session
        .next_matching(|k| match k {
            agent::server_message::Kind::StatusRefused(r) => Some(r.reason),
            _ => None,
        })
        .await
        .unwrap();
    assert!(
        reason.contains("hostname is 300 bytes; at most 256"),
        "{reason}"
    );
    let mut bad_alert = memory_warning();
    bad_alert.monitor = "gpu".into();
    session
        .send(report_of(None, Some(resources(vec![bad_alert]))))
        .await;
    let reason = session
        .next_matching(|k| match k {
            agent::server_message::Kind::StatusRefused(r) => Some(r.reason),
            _ => None,
        })
        .await
        .unwrap();
    assert!(reason.contains("unknown monitor \"gpu\""), "{reason}");
    let device = get(&mut devices).await;
    assert_eq!(
        device
            .status
            .as_ref()
            .unwrap()
            .system_info
            .as_ref()
            .unwrap()
            .hostname,
        "edge-a.lab"
    );

    // The monitor stops firing: the condition clears and its time moves.
    session.send(report_of(None, Some(resources(vec![])))).await;
    let device = wait_for("ResourcePressure to clear", Duration::from_secs(10), || {
        let fetch = get(&mut devices);
        async move {
            let device = fetch.await;
            (device.status.as_ref()?.summary == admin::DeviceSummary::Healthy as i32)
                .then_some(device)
        }
    })
    .await;
    let cleared = condition(&device, "ResourcePressure");
    assert_eq!(cleared.status, admin::ConditionStatus::False as i32);
    assert_eq!(cleared.reason, "WithinThresholds");
    assert!(
        cleared.last_transition_time.unwrap().seconds
            >= pressure.last_transition_time.unwrap().seconds
    );
    assert_eq!(
        names(&mut devices, "status.summary=Degraded").await,
        Vec::<String>::new()
    );

    // A failed unit is an error naming it; once it runs again the device is healthy.
    let unit = |state: &str| agent::WorkloadReport {
        items: vec![agent::WorkloadStatus {
            kind: "unit".into(),
            name: "app.service".into(),
            state: state.into(),
            sub_state: state.into(),
            restarts: 4,
            ..Default::default()
        }],
    };
    session
        .send(agent::agent_message::Kind::Status(agent::Status {
            workloads: Some(unit("failed")),
            ..Default::default()
        }))
        .await;
    let device = wait_for("WorkloadFailed", Duration::from_secs(10), || {
        let fetch = get(&mut devices);
        async move {
            let device = fetch.await;
            (device.status.as_ref()?.summary == admin::DeviceSummary::Error as i32)
                .then_some(device)
        }
    })
    .await;
    let failed = condition(&device, "WorkloadFailed");
    assert_eq!(failed.status, admin::ConditionStatus::True as i32);
    assert_eq!(failed.message, "unit app.service failed");
    assert_eq!(device.status.as_ref().unwrap().workloads[0].restarts, 4);
    session
        .send(agent::agent_message::Kind::Status(agent::Status {
            workloads: Some(unit("active")),
            ..Default::default()
        }))
        .await;
    wait_for("the unit running again", Duration::from_secs(10), || {
        let fetch = get(&mut devices);
        async move {
            let device = fetch.await;
            (device.status.as_ref()?.summary == admin::DeviceSummary::Healthy as i32).then_some(())
        }
    })
    .await;

    // Written behind: the store holds the last report.
    server.control.flush_journal().await;
    let stored = server.control.store().device_reports().await.unwrap();
    let report = &stored[&device_id];
    assert_eq!(report.system_info.as_ref().unwrap().hostname, "edge-a.lab");
    assert!(report.alerts.is_empty());
    assert!(!stored.contains_key(&quiet_id));

    let metrics = http_body(&format!("{}/metrics", server.metrics_url)).await;
    for line in [
        "flotilla_devices_health{health=\"Healthy\"} 2",
        "flotilla_devices_health{health=\"Degraded\"} 0",
        "flotilla_devices_condition{condition=\"Online\"} 2",
        "flotilla_devices_os{os=\"debian\"} 1",
        "flotilla_devices_os{os=\"unknown\"} 1",
        "flotilla_status_reports_total{result=\"refused\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    drop(session);
    drop(quiet);
    server.stop().await;
}
