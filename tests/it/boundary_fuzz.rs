//! Fuzzing the agent endpoint at its boundary: a real server over TLS is fed arbitrary agent
//! messages — random protobuf bytes decoded as messages, and well-formed messages with hostile
//! fields (garbage CSRs, huge strings, control characters, wrong ids) — on a device's session.
//! Whatever arrives, the server answers or ends that session with a clear status (never INTERNAL
//! or UNKNOWN) and keeps serving: the device opens a fresh session afterwards. SQLite by default;
//! PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use flotilla::proto::agent::v1 as agent;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use std::time::Duration;
use support::TestServer;
use support::sim::RawSession;
use tonic::Code;

/// Text an agent might send: short, long, with control characters and odd Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,24}",
        "[\\x00-\\x1f\\x7f\u{202e}a-z]{0,32}",
        (0usize..70_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn csr_pem() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        "[A-Za-z0-9+/=]{0,400}".prop_map(|body| format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"
        )),
    ]
}

fn kind() -> impl Strategy<Value = Option<agent::agent_message::Kind>> {
    use agent::agent_message::Kind;
    prop_oneof![
        Just(None),
        (text(), text(), text(), text()).prop_map(
            |(device_id, version, agent_version, boot_id)| {
                Some(Kind::Hello(agent::Hello {
                    device_id,
                    rendered_version: version,
                    agent_version,
                    boot_id,
                    ..Default::default()
                }))
            }
        ),
        (text(), text())
            .prop_map(|(nonce, version)| Some(Kind::Ack(agent::Ack { nonce, version }))),
        (text(), text(), text(), any::<bool>()).prop_map(|(nonce, version, error, rolled_back)| {
            Some(Kind::Nack(agent::Nack {
                nonce,
                version,
                error,
                rolled_back,
            }))
        }),
        (text(), text()).prop_map(|(applied_version, message)| {
            Some(Kind::Status(agent::Status {
                applied_version,
                message,
                ..Default::default()
            }))
        }),
        (
            text(),
            prop::collection::vec((text(), prop::collection::vec(text(), 0..10)), 0..20),
            prop::collection::vec((text(), text(), any::<i32>(), any::<u32>()), 0..40),
            prop::collection::vec((text(), any::<u64>(), any::<u64>()), 0..20),
            (any::<u32>(), any::<u64>(), any::<u64>()),
        )
            .prop_map(
                |(hostname, interfaces, alerts, filesystems, (cpu, total, used))| {
                    Some(Kind::Status(agent::Status {
                        system_info: Some(agent::DeviceSystemInfo {
                            hostname,
                            interfaces: interfaces
                                .into_iter()
                                .map(|(name, addresses)| agent::NetworkInterface {
                                    name,
                                    addresses,
                                })
                                .collect(),
                            ..Default::default()
                        }),
                        resources: Some(agent::ResourceReport {
                            usage: Some(agent::ResourceUsage {
                                cpu_percent: cpu,
                                memory_total_bytes: total,
                                memory_used_bytes: used,
                                filesystems: filesystems
                                    .into_iter()
                                    .map(|(mount_point, total_bytes, used_bytes)| {
                                        agent::FilesystemUsage {
                                            mount_point,
                                            total_bytes,
                                            used_bytes,
                                        }
                                    })
                                    .collect(),
                                ..Default::default()
                            }),
                            alerts: alerts
                                .into_iter()
                                .map(|(monitor, path, severity, percent)| agent::ResourceAlert {
                                    monitor,
                                    path,
                                    severity,
                                    percent,
                                    ..Default::default()
                                })
                                .collect(),
                        }),
                        ..Default::default()
                    }))
                }
            ),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| {
            Some(Kind::Heartbeat(agent::Heartbeat {
                sent_at: Some(prost_types::Timestamp { seconds, nanos }),
            }))
        }),
        (text(), csr_pem()).prop_map(|(request_id, csr_pem)| {
            Some(Kind::CertificateRequest(agent::CertificateRequest {
                request_id,
                csr_pem,
            }))
        }),
        (text(), text(), text()).prop_map(|(request_id, serial, reason)| {
            Some(Kind::CertificateRejected(agent::CertificateRejected {
                request_id,
                serial,
                reason,
            }))
        }),
    ]
}

/// A message: well-formed with hostile fields, or random bytes that happen to decode.
fn agent_message() -> impl Strategy<Value = agent::AgentMessage> {
    prop_oneof![
        3 => kind().prop_map(|kind| agent::AgentMessage { kind }),
        1 => prop::collection::vec(any::<u8>(), 0..256)
            .prop_map(|bytes| agent::AgentMessage::decode(bytes.as_slice()).unwrap_or_default()),
    ]
}

#[test]
fn arbitrary_agent_messages_get_clear_answers_and_the_server_keeps_serving() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(TestServer::start());
    let (creds, device_id) = runtime.block_on(server.enroll_device("fuzzed"));
    // A short run in every suite; `.ci/run` runs it longer with PROPTEST_CASES.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(agent_message(), 1..5), |messages| {
            runtime.block_on(async {
                let mut session = RawSession::open(&server.agent_url, &creds, &device_id)
                    .await
                    .expect("a session opens");
                for message in messages {
                    if session.tx.send(message).await.is_err() {
                        break;
                    }
                }
                // Drain what the server says until it ends the session or goes quiet.
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_millis(200), session.inbound.message())
                            .await;
                    match next {
                        Err(_) | Ok(Ok(None)) => break,
                        Ok(Ok(Some(_))) => {}
                        Ok(Err(status)) => {
                            prop_assert!(
                                !matches!(status.code(), Code::Internal | Code::Unknown),
                                "unclear status: {status:?}"
                            );
                            break;
                        }
                    }
                }
                Ok(())
            })
        })
        .unwrap();

    // Still serving: the device opens a fresh session and is accepted.
    runtime.block_on(async {
        let mut session = RawSession::open(&server.agent_url, &creds, &device_id)
            .await
            .unwrap();
        let accepted = session
            .next_matching(|kind| match kind {
                agent::server_message::Kind::Accepted(accepted) => Some(accepted),
                _ => None,
            })
            .await;
        assert!(accepted.is_some(), "a fresh session is accepted");
    });
}
