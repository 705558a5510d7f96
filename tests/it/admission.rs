//! Admission control and session lifetime: agents beyond the limits are told when to come back
//! (RESOURCE_EXHAUSTED with a retry delay), a freed place admits them, and old sessions are asked
//! to reconnect.

use crate::support;

use flotilla::client::retry_after;
use flotilla::control::{AdmissionSettings, Policy, SessionSettings};
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use std::time::{Duration, Instant};
use support::sim::RawSession;
use support::{TestServer, channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn policy(admission: AdmissionSettings) -> Policy {
    Policy {
        admission,
        ..Policy::default()
    }
}

async fn accepted(session: &mut RawSession) {
    session
        .next_matching(|kind| {
            matches!(kind, agent::server_message::Kind::Accepted(_)).then_some(())
        })
        .await
        .expect("session accepted");
}

#[tokio::test]
async fn sessions_beyond_the_limit_are_told_when_to_retry() {
    let server = TestServer::start_with(policy(AdmissionSettings {
        max_sessions: 2,
        retry_after: Duration::from_millis(400),
        ..AdmissionSettings::default()
    }))
    .await;
    let mut devices = Vec::new();
    for name in ["a", "b", "c"] {
        devices.push(server.enroll_device(name).await);
    }
    let mut first = RawSession::open(&server.agent_url, &devices[0].0, &devices[0].1)
        .await
        .unwrap();
    accepted(&mut first).await;
    let mut second = RawSession::open(&server.agent_url, &devices[1].0, &devices[1].1)
        .await
        .unwrap();
    accepted(&mut second).await;

    let refused = RawSession::open(&server.agent_url, &devices[2].0, &devices[2].1)
        .await
        .err()
        .expect("a third session is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let wait = retry_after(&refused).expect("a retry delay");
    assert!(
        (Duration::from_millis(400)..=Duration::from_millis(800)).contains(&wait),
        "{wait:?}"
    );

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut third = loop {
        match RawSession::open(&server.agent_url, &devices[2].0, &devices[2].1).await {
            Ok(session) => break session,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(Instant::now() < deadline, "the freed place was never given");
                tokio::time::sleep(retry_after(&status).unwrap()).await;
            }
        }
    };
    accepted(&mut third).await;
}

#[tokio::test]
async fn only_so_many_sessions_may_be_opening_at_once() {
    let server = TestServer::start_with(policy(AdmissionSettings {
        max_opening: 1,
        ..AdmissionSettings::default()
    }))
    .await;
    let (slow_creds, _) = server.enroll_device("slow").await;
    let (creds, id) = server.enroll_device("prompt").await;

    // A session that never says Hello holds the only opening place until the Hello timeout.
    let (_hold, rx) = mpsc::channel::<agent::AgentMessage>(1);
    let url = server.agent_url.clone();
    let slow = tokio::spawn(async move {
        AgentServiceClient::new(channel(&url, &slow_creds).await)
            .session(ReceiverStream::new(rx))
            .await
            .map(|_| ())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match RawSession::open(&server.agent_url, &creds, &id).await {
            Err(status) => break status,
            Ok(_) => {
                // The slow session had not reached the server yet.
                assert!(Instant::now() < deadline, "never refused");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("being opened"), "{refused:?}");
    assert!(retry_after(&refused).is_some());

    slow.abort();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match RawSession::open(&server.agent_url, &creds, &id).await {
            Ok(mut session) => {
                accepted(&mut session).await;
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "the opening place never came back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn old_sessions_are_asked_to_reconnect() {
    let server = TestServer::start_with(Policy {
        session: SessionSettings {
            max_age: Some(Duration::from_millis(500)),
            ..SessionSettings::default()
        },
        ..Policy::default()
    })
    .await;
    let (creds, id) = server.enroll_device("aging").await;
    let opened = Instant::now();
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let reconnect = session
        .next_matching(|kind| match kind {
            agent::server_message::Kind::Reconnect(r) => Some(r),
            _ => None,
        })
        .await
        .expect("a Reconnect directive");
    let age = opened.elapsed();
    assert!(
        (Duration::from_millis(450)..Duration::from_secs(5)).contains(&age),
        "{age:?}"
    );
    assert!(reconnect.reason.contains("maximum age"), "{reconnect:?}");
    assert!(reconnect.within.is_some_and(|w| w.seconds > 0));
    assert!(
        session.next_matching(|_| Some(())).await.is_none(),
        "the stream ends after the directive"
    );
    // The device may come straight back.
    let mut again = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    accepted(&mut again).await;
}
