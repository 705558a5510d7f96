//! A simulated agent speaking the real session protocol over real mTLS: it says Hello, ACKs every
//! push (recording it), and sends heartbeats at a fixed interval.

use super::{TestServer, channel, wait_for};
use flotilla::client::ClientCredentials;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn message(kind: agent::agent_message::Kind) -> agent::AgentMessage {
    agent::AgentMessage { kind: Some(kind) }
}

/// What a simulated agent has seen.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    /// Versions pushed to it, in order.
    pub pushes: Vec<String>,
    pub heartbeats_sent: usize,
}

pub(crate) struct SimAgent {
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl SimAgent {
    /// Opens a session and keeps answering until dropped.
    pub(crate) async fn connect(
        url: &str,
        creds: &ClientCredentials,
        device_id: &str,
        heartbeat: Duration,
    ) -> SimAgent {
        SimAgent::connect_rejecting(url, creds, device_id, heartbeat, None).await
    }

    /// Like `connect`, NACKing every push with a file whose content contains `reject`.
    pub(crate) async fn connect_rejecting(
        url: &str,
        creds: &ClientCredentials,
        device_id: &str,
        heartbeat: Duration,
        reject: Option<String>,
    ) -> SimAgent {
        let RawSession { tx, mut inbound } = RawSession::open(url, creds, device_id).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut beat = tokio::time::interval(heartbeat);
            beat.reset();
            loop {
                tokio::select! {
                    _ = beat.tick() => {
                        let heartbeat = agent::Heartbeat { sent_at: None };
                        if tx.send(message(agent::agent_message::Kind::Heartbeat(heartbeat))).await.is_err() {
                            return;
                        }
                        record.lock().unwrap().heartbeats_sent += 1;
                    }
                    next = inbound.message() => {
                        let Ok(Some(server)) = next else { return };
                        if let Some(agent::server_message::Kind::Spec(push)) = server.kind {
                            record.lock().unwrap().pushes.push(push.version.clone());
                            let bad = reject.as_deref().is_some_and(|marker| {
                                push.spec.iter().flat_map(|s| &s.files).any(|f| f.content.contains(marker))
                            });
                            let answer = if bad {
                                agent::agent_message::Kind::Nack(agent::Nack {
                                    nonce: push.nonce,
                                    version: push.version,
                                    error: "refused by the test".into(),
                                    rolled_back: false,
                                })
                            } else {
                                agent::agent_message::Kind::Ack(agent::Ack { nonce: push.nonce, version: push.version })
                            };
                            if tx.send(message(answer)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        SimAgent { seen, task }
    }

    pub(crate) fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A session driven message by message by the test.
pub(crate) struct RawSession {
    pub tx: mpsc::Sender<agent::AgentMessage>,
    pub inbound: tonic::Streaming<agent::ServerMessage>,
}

impl RawSession {
    pub(crate) async fn open(
        url: &str,
        creds: &ClientCredentials,
        device_id: &str,
    ) -> Result<RawSession, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(message(agent::agent_message::Kind::Hello(agent::Hello {
            device_id: device_id.into(),
            ..Default::default()
        })))
        .await
        .unwrap();
        let inbound = AgentServiceClient::new(channel(url, creds).await)
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawSession { tx, inbound })
    }

    pub(crate) async fn send(&self, kind: agent::agent_message::Kind) {
        self.tx.send(message(kind)).await.unwrap();
    }

    /// The next server message that `pick` accepts (others, like spec pushes, are skipped);
    /// `None` if the stream ends first.
    pub(crate) async fn next_matching<T>(
        &mut self,
        pick: impl FnMut(agent::server_message::Kind) -> Option<T>,
    ) -> Option<T> {
        self.next_matching_within(Duration::from_secs(15), pick)
            .await
            .expect("an answer within 15 s")
    }

    /// Like `next_matching`, but `None` (instead of a panic) when nothing matches within `limit`.
    pub(crate) async fn next_matching_within<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(agent::server_message::Kind) -> Option<T>,
    ) -> Option<Option<T>> {
        let wait = async {
            loop {
                match self.inbound.message().await {
                    Ok(Some(agent::ServerMessage { kind: Some(kind) })) => {
                        if let Some(found) = pick(kind) {
                            return Some(found);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok()
    }
}

/// Enrolls `names` (approved with `labels`) and connects a simulated agent for each; agents NACK
/// pushes with a file containing `reject`. Returns (device id, agent) pairs.
pub(crate) async fn connect_fleet(
    server: &TestServer,
    names: &[String],
    labels: &std::collections::BTreeMap<String, String>,
    heartbeat: Duration,
    reject: Option<&str>,
) -> Vec<(String, SimAgent)> {
    let mut agents = Vec::new();
    for name in names {
        let (creds, id) = server.enroll_device_with(name, labels.clone()).await;
        let sim = SimAgent::connect_rejecting(
            &server.agent_url,
            &creds,
            &id,
            heartbeat,
            reject.map(str::to_string),
        )
        .await;
        agents.push((id, sim));
    }
    agents
}

/// Waits until every device of `agents` is SYNCED.
pub(crate) async fn all_synced(server: &TestServer, agents: &[(String, SimAgent)]) {
    let hub = server.control.hub().clone();
    let ids: Vec<String> = agents.iter().map(|(id, _)| id.clone()).collect();
    wait_for("every device SYNCED", Duration::from_secs(60), || {
        let (hub, ids) = (hub.clone(), ids.clone());
        async move {
            ids.iter()
                .all(|id| {
                    hub.status(id)
                        .is_some_and(|s| s.state == flotilla::hub::SyncState::Synced)
                })
                .then_some(())
        }
    })
    .await;
}
