//! The comparison: Debian's Mosquitto with the same N mutual-TLS client connections (the run's CA,
//! the devices' own certificates), each subscribed to one topic; its memory per connection and the
//! time to deliver one published message to all N.

use crate::measure::{Latencies, socket_memory, usage};
use crate::server::{Device, free_port};
use anyhow::{Context, Result, bail};
use flotilla::client::ClientCredentials;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Serialize;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOPIC: &str = "flotilla/load/spec";

#[derive(Serialize)]
pub(crate) struct MosquittoFigures {
    pub connections: usize,
    pub connect_seconds: f64,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub rss_per_connection_kib: f64,
    pub socket_memory_kib: Option<f64>,
    pub delivery: Latencies,
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls(creds: &ClientCredentials) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

fn options(client_id: &str, port: u16, creds: &ClientCredentials) -> Result<MqttOptions> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls(creds)?)));
    Ok(options)
}

/// Subscribed clients and when each received the message.
#[derive(Default)]
struct Seen {
    subscribed: AtomicUsize,
    received: Mutex<Vec<Instant>>,
}

/// One subscriber: (re)connects, subscribes after every CONNACK, records each PUBLISH.
async fn subscriber(options: MqttOptions, seen: Arc<Seen>) {
    let (client, mut events) = AsyncClient::new(options, 4);
    let mut subscribed = false;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.try_subscribe(TOPIC, QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                subscribed = true;
                seen.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(_))) => {
                if let Ok(mut received) = seen.received.lock() {
                    received.push(Instant::now());
                }
            }
            Ok(_) => {}
            Err(_) => {
                let pause = rand::random_range(200..1000);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

/// Runs the comparison with one connection per device; `publisher` is another client identity.
pub(crate) async fn run(
    work: &Path,
    devices: &[Device],
    publisher: &ClientCredentials,
    server_cert: (String, String),
    payload: Vec<u8>,
) -> Result<MosquittoFigures> {
    let port = free_port()?;
    let dir = work.join("mosquitto");
    std::fs::create_dir_all(&dir)?;
    let ca = publisher.ca_pem.clone();
    std::fs::write(dir.join("ca.pem"), ca)?;
    std::fs::write(dir.join("server.pem"), &server_cert.0)?;
    std::fs::write(dir.join("server.key"), &server_cert.1)?;
    let config = format!(
        "listener {port} 127.0.0.1\n\
         cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
         require_certificate true\nallow_anonymous true\npersistence false\n\
         log_dest stderr\nlog_type error\n",
        d = dir.display()
    );
    std::fs::write(dir.join("mosquitto.conf"), config)?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting mosquitto (Debian package mosquitto)")?;
    let broker = Broker(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("mosquitto did not start listening on {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = broker.0.id();
    let (rss_before, _) = usage(pid)?;

    let seen = Arc::new(Seen::default());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        tasks.push(tokio::spawn(subscriber(
            options(&device.name, port, &device.creds)?,
            seen.clone(),
        )));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    let n = devices.len();
    crate::fleet::wait_until(Duration::from_secs(600), "mosquitto subscriptions", || {
        seen.subscribed.load(Ordering::Relaxed) >= n
    })
    .await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_after, _) = usage(pid)?;
    let socket_memory_kib = socket_memory(port);

    let (client, mut events) = AsyncClient::new(options("load-publisher", port, publisher)?, 4);
    let publisher_task = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let published = Instant::now();
    client
        .publish(TOPIC, QoS::AtLeastOnce, false, payload)
        .await?;
    crate::fleet::wait_until(Duration::from_secs(120), "mosquitto delivery", || {
        seen.received.lock().map(|r| r.len()).unwrap_or(0) >= n
    })
    .await?;
    let delivery = Latencies::of(
        seen.received
            .lock()
            .map(|r| {
                r.iter()
                    .map(|at| at.duration_since(published).as_secs_f64() * 1000.0)
                    .collect()
            })
            .unwrap_or_default(),
    );
    publisher_task.abort();
    for task in tasks {
        task.abort();
    }
    drop(broker);
    Ok(MosquittoFigures {
        connections: n,
        connect_seconds,
        rss_before_mib: rss_before / 1024.0,
        rss_after_mib: rss_after / 1024.0,
        rss_per_connection_kib: (rss_after - rss_before) / n as f64,
        socket_memory_kib,
        delivery,
    })
}
