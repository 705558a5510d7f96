//! Waves: a new desired spec is held until changes stop arriving for a short quiet period
//! (bounded by a maximum delay), then released to every waiting session at once, so a burst of
//! edits becomes one push per device.

use super::{Hub, HubState, Rendered, entry_for};
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
        let mut state = self.lock();
        let HubState { devices, wave } = &mut *state;
        let entry = entry_for(devices, device_id);
        let had_error = entry.render_error.take().is_some();
        if entry.desired_version() == Some(desired.version.as_str()) {
            // Same content: adopt the shared instance, push nothing.
            entry.desired = Some(desired);
            drop(state);
            if had_error {
                self.changed(device_id);
            }
            return had_error;
        }
        entry.desired = Some(desired);
        // Only a session held here is pushed by this replica. A device whose session is elsewhere
        // (or nowhere) gets the new spec when a session opens here, so holding it for the wave
        // would only keep the quiet period from starting while the rest of a large fleet renders.
        let pushed_here = entry.session.is_some();
        if pushed_here && !entry.held {
            entry.held = true;
            wave.push(device_id.to_string());
        }
        entry.note_change(self.clock.now_millis());
        drop(state);
        if pushed_here {
            self.generation.fetch_add(1, Ordering::Relaxed);
            self.wave_pending.notify_one();
        }
        self.announce(device_id);
        true
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

    /// Records that a device's spec could not be rendered; it keeps its last good spec. Returns
    /// whether the reason is new (and was announced).
    pub fn set_render_failed(&self, device_id: &str, reason: String) -> bool {
        let mut state = self.lock();
        let entry = entry_for(&mut state.devices, device_id);
        if entry.render_error.as_ref() == Some(&reason) {
            return false;
        }
        entry.render_error = Some(reason);
        drop(state);
        self.changed(device_id);
        true
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
