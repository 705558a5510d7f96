//! Waves: a new desired spec is held until changes stop arriving for a short quiet period
//! (bounded by a maximum delay), then released to every waiting session at once, so a burst of
//! edits becomes one push per device.

use super::{DeviceEntry, Hub, HubState, RenderOutcome, Rendered, entry_for};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How long changes are held so that bursts coalesce into one wave of pushes.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    /// A wave is released once no change arrived for this long…
    pub quiet: Duration,
    /// …or once its first change has waited this long.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(150),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl Hub {
    /// Sets what a device should run (a new device, or a new render). A changed version is held
    /// for the next wave. Returns whether the device's status changed (and was announced).
    pub fn set_desired(&self, device_id: &str, desired: Arc<Rendered>) -> bool {
        self.take_render(device_id, Ok(desired))
    }

    /// Records that a device's spec could not be rendered; it keeps its last good spec. Returns
    /// whether the reason is new (and was announced).
    pub fn set_render_failed(&self, device_id: &str, reason: String) -> bool {
        self.take_render(device_id, Err(reason))
    }

    fn take_render(&self, device_id: &str, render: RenderOutcome) -> bool {
        let mut state = self.lock();
        let HubState { devices, wave, .. } = &mut *state;
        let entry = entry_for(devices, device_id);
        let taken = taken_render(entry, device_id, render, wave);
        if taken != Taken::Same {
            entry.note_change(self.clock.now_millis());
        }
        drop(state);
        if taken == Taken::Held {
            self.wave_grew();
        }
        if taken != Taken::Same {
            self.announce(device_id);
        }
        taken != Taken::Same
    }

    /// Hands a batch of renders over under one lock (a fleet's change renders thousands of
    /// devices, and the sessions pulling their pushes contend for the same lock). Every device in
    /// the batch is settled and announced once, whether or not its render changed: whatever else
    /// changed about it (labels, owner) is announced after its new render is in place. `None`:
    /// the device is not in the catalog (deleted meanwhile).
    pub fn apply_renders(&self, mut renders: Vec<(String, Option<RenderOutcome>)>) {
        let now_ms = self.clock.now_millis();
        let mut grew = false;
        let mut state = self.lock();
        let HubState { devices, wave, .. } = &mut *state;
        for (device_id, render) in &mut renders {
            let entry = match render.take() {
                Some(render) => {
                    let entry = entry_for(devices, device_id);
                    grew |= taken_render(entry, device_id, render, wave) == Taken::Held;
                    entry
                }
                None => match devices.get_mut(device_id.as_str()) {
                    Some(entry) => entry,
                    None => continue,
                },
            };
            entry.note_change(now_ms);
        }
        drop(state);
        if grew {
            self.wave_grew();
        }
        for (device_id, _) in &renders {
            self.announce(device_id);
        }
    }

    /// A change joined the wave: the quiet period starts again.
    fn wave_grew(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.wave_pending.notify_one();
    }

    /// Orders `device_ids` so that those whose session this replica holds come first: their
    /// renders are what its sessions wait for; the rest only update what it reports.
    pub fn sessions_first(&self, device_ids: impl IntoIterator<Item = String>) -> Vec<String> {
        let state = self.lock();
        let (mut here, rest): (Vec<String>, Vec<String>) = device_ids
            .into_iter()
            .partition(|id| state.get(id).is_some_and(|e| e.session.is_some()));
        drop(state);
        here.extend(rest);
        here
    }

    /// Releases the held changes: every waiting session is woken to pull its new spec.
    pub fn release_wave(&self) -> usize {
        let mut state = self.lock();
        let wave = std::mem::take(&mut state.wave);
        for id in &wave {
            if let Some(entry) = state.get_mut(id) {
                entry.held = false;
                entry.wake();
            }
        }
        wave.len()
    }

    /// Runs forever, releasing each burst of changes as one wave once it has settled.
    pub async fn run_waves(&self, debounce: Debounce) {
        loop {
            self.wave_pending.notified().await;
            let first = Instant::now();
            loop {
                let seen = self.generation.load(Ordering::Relaxed);
                tokio::time::sleep(debounce.quiet).await;
                let settled = self.generation.load(Ordering::Relaxed) == seen;
                if settled || first.elapsed() >= debounce.max_delay {
                    break;
                }
            }
            let devices = self.release_wave();
            tracing::debug!(devices, "released a wave of spec changes");
        }
    }
}

/// What a render did to a device's entry.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Nothing: the same spec, or the same failure again.
    Same,
    /// Its status changed (a new spec for a session elsewhere or nowhere, or a failure).
    Changed,
    /// A new spec waits for the wave of this replica's session.
    Held,
}

fn taken_render(
    entry: &mut DeviceEntry,
    device_id: &str,
    render: RenderOutcome,
    wave: &mut Vec<String>,
) -> Taken {
    let desired = match render {
        Ok(desired) => desired,
        Err(reason) if entry.render_error.as_ref() == Some(&reason) => return Taken::Same,
        Err(reason) => {
            entry.render_error = Some(reason);
            return Taken::Changed;
        }
    };
    let had_error = entry.render_error.take().is_some();
    if entry.desired_version() == Some(desired.version.as_str()) {
        // Same content: adopt the shared instance, push nothing.
        entry.desired = Some(desired);
        return if had_error {
            Taken::Changed
        } else {
            Taken::Same
        };
    }
    entry.desired = Some(desired);
    // Only a session held here is pushed by this replica. A device whose session is elsewhere
    // (or nowhere) gets the new spec when a session opens here, so holding it for the wave
    // would only keep the quiet period from starting while the rest of a large fleet renders.
    if entry.session.is_none() {
        return Taken::Changed;
    }
    if !entry.held {
        entry.held = true;
        wave.push(device_id.to_string());
    }
    Taken::Held
}
