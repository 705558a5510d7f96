//! Worker processes of a split fleet: the parent writes each worker its share of the devices,
//! the worker runs those agents and relays every [`Event`] on stdout as one line, and stops when
//! its stdin closes (so a dying parent never leaves workers behind).

use crate::fleet::{Event, Shared, spawn_agents};
use crate::server::Device;
use anyhow::{Context, Result, bail};
use flotilla::client::ClientCredentials;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What a worker is given: its slice of the fleet.
#[derive(Serialize, Deserialize)]
struct Input {
    base: usize,
    ports: Vec<u16>,
    /// The agents send status reports.
    #[serde(default)]
    status: bool,
    ca_pem: String,
    devices: Vec<InputDevice>,
}

#[derive(Serialize, Deserialize)]
struct InputDevice {
    id: String,
    name: String,
    cert_pem: String,
    key_pem: String,
}

/// Instants of two processes compared through the wall clock they share.
#[derive(Clone, Copy)]
struct WallClock {
    instant: Instant,
    micros: i128,
}

impl WallClock {
    fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            micros: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as i128)
                .unwrap_or(0),
        }
    }

    fn micros_of(&self, at: Instant) -> i128 {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.micros + after.as_micros() as i128,
            None => self.micros - self.instant.duration_since(at).as_micros() as i128,
        }
    }

    fn instant_of(&self, micros: i128) -> Instant {
        let offset = std::time::Duration::from_micros((micros - self.micros).unsigned_abs() as u64);
        if micros >= self.micros {
            self.instant + offset
        } else {
            self.instant.checked_sub(offset).unwrap_or(self.instant)
        }
    }
}

fn encode(agent: usize, event: &Event, clock: &WallClock) -> String {
    match event {
        Event::Synced(at) => format!("{agent} S {}", clock.micros_of(*at)),
        Event::Acked(at) => format!("{agent} A {}", clock.micros_of(*at)),
        Event::Renewed(at) => format!("{agent} R {}", clock.micros_of(*at)),
        Event::OnPort(port) => format!("{agent} P {port}"),
        Event::ToldBusy => format!("{agent} B"),
        Event::SessionLost => format!("{agent} L"),
        Event::Refused => format!("{agent} F"),
        Event::Error(error) => format!("{agent} E {}", error.replace(['\n', '\r'], " ")),
    }
}

fn decode(line: &str, clock: &WallClock) -> Result<(usize, Event)> {
    let mut parts = line.splitn(3, ' ');
    let agent: usize = parts.next().unwrap_or_default().parse()?;
    let kind = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let event = match kind {
        "S" => Event::Synced(clock.instant_of(rest.parse()?)),
        "A" => Event::Acked(clock.instant_of(rest.parse()?)),
        "R" => Event::Renewed(clock.instant_of(rest.parse()?)),
        "P" => Event::OnPort(rest.parse()?),
        "B" => Event::ToldBusy,
        "L" => Event::SessionLost,
        "F" => Event::Refused,
        "E" => Event::Error(rest.to_string()),
        other => bail!("unknown event {other:?}"),
    };
    Ok((agent, event))
}

/// A running worker process and the thread folding its events into the parent's view.
pub(crate) struct Worker {
    child: Child,
}

impl Worker {
    /// Starts a worker for `devices` (fleet-wide indices from `base`).
    pub(crate) fn start(
        devices: Vec<Device>,
        base: usize,
        ports: &[u16],
        work: &Path,
        shared: Arc<Shared>,
    ) -> Result<Worker> {
        let input = Input {
            base,
            ports: ports.to_vec(),
            status: shared.status,
            ca_pem: devices
                .first()
                .map(|d| d.creds.ca_pem.clone())
                .unwrap_or_default(),
            devices: devices
                .into_iter()
                .map(|d| InputDevice {
                    id: d.id,
                    name: d.name,
                    cert_pem: d.creds.cert_pem,
                    key_pem: d.creds.key_pem,
                })
                .collect(),
        };
        let path: PathBuf = work.join(format!("worker-{base}.json"));
        std::fs::create_dir_all(work)?;
        std::fs::write(&path, serde_json::to_vec(&input)?)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--worker")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a harness worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let clock = WallClock::now();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match decode(&line, &clock) {
                    Ok((agent, event)) => shared.record(agent, event),
                    Err(error) => {
                        shared.record(base, Event::Error(format!("worker sent {line:?}: {error}")))
                    }
                }
            }
            shared.record(
                base,
                Event::Error(format!("the worker for agents from {base} ended")),
            );
        });
        Ok(Worker { child })
    }

    pub(crate) fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The worker's side: runs its agents and relays their events until stdin closes.
pub(crate) async fn run(input_path: &Path) -> Result<()> {
    crate::measure::raise_file_limit();
    let input: Input = serde_json::from_slice(&std::fs::read(input_path)?)?;
    let _ = std::fs::remove_file(input_path);
    let (sink, events) = std::sync::mpsc::channel::<(usize, Event)>();
    let clock = WallClock::now();
    std::thread::spawn(move || {
        let mut out = BufWriter::new(std::io::stdout().lock());
        while let Ok(first) = events.recv() {
            let mut batch = vec![first];
            batch.extend(events.try_iter());
            for (agent, event) in &batch {
                if writeln!(out, "{}", encode(*agent, event, &clock)).is_err() {
                    std::process::exit(0);
                }
            }
            if out.flush().is_err() {
                std::process::exit(0);
            }
        }
    });
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let devices: Vec<Device> = input
        .devices
        .into_iter()
        .map(|d| Device {
            id: d.id,
            name: d.name,
            creds: ClientCredentials {
                ca_pem: input.ca_pem.clone(),
                cert_pem: d.cert_pem,
                key_pem: d.key_pem,
                server_name: "localhost".into(),
            },
        })
        .collect();
    let shared = Arc::new(
        Shared::new(devices.len(), input.base, input.ports)
            .relaying(sink)
            .reporting_status(input.status),
    );
    let _tasks = spawn_agents(devices, &shared).await;
    std::future::pending::<()>().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn events_survive_the_line_format() {
        let clock = WallClock::now();
        let at = clock.instant + Duration::from_millis(1234);
        for event in [
            Event::Acked(at),
            Event::OnPort(4242),
            Event::ToldBusy,
            Event::Error("session refused\nbadly".into()),
        ] {
            let (agent, back) = decode(&encode(17, &event, &clock), &clock).unwrap();
            assert_eq!(agent, 17);
            match (&event, &back) {
                (Event::Acked(a), Event::Acked(b)) => {
                    assert!(a.max(b).duration_since(*a.min(b)) < Duration::from_millis(1))
                }
                (Event::Error(_), Event::Error(b)) => assert_eq!(b, "session refused badly"),
                _ => assert_eq!(event, back),
            }
        }
        assert!(decode("3 Q", &clock).is_err());
    }
}
