//! The set of refused certificate serials (revoked or superseded), consulted on every request by
//! the authentication layer and at every session opening and issuance, and updated the moment a
//! certificate is revoked. Loaded from the store at start; until it is, nothing is trusted. Open
//! admin calls subscribe to its changes and end when their certificate joins it.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

/// The serials of every revoked certificate, which the auth layer refuses.
#[derive(Debug)]
pub struct RevokedSerials {
    serials: RwLock<HashSet<String>>,
    /// The stored revocations are in the set (and the rest of the state is loaded): until then a
    /// certificate cannot be told apart from a revoked one, so no request is served.
    loaded: AtomicBool,
    /// Bumped whenever serials join the set.
    generation: watch::Sender<u64>,
}

impl Default for RevokedSerials {
    fn default() -> Self {
        RevokedSerials {
            serials: RwLock::default(),
            loaded: AtomicBool::new(false),
            generation: watch::Sender::new(0),
        }
    }
}

impl RevokedSerials {
    /// Whether `serial` (lowercase hex) was revoked.
    pub fn contains(&self, serial: &str) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    /// Adds revoked serials; subscribers are woken when any is new.
    pub fn extend(&self, serials: impl IntoIterator<Item = String>) {
        let added = {
            let mut set = self.serials.write().unwrap_or_else(|p| p.into_inner());
            let mut added = false;
            for serial in serials {
                added |= set.insert(serial);
            }
            added
        };
        if added {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Wakes whenever serials join the set.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Declares the set complete: the control plane's state is loaded.
    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// Whether the set is complete (see `mark_loaded`).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_incomplete_until_marked() {
        let set = RevokedSerials::default();
        assert!(!set.is_loaded());
        set.extend(["01".to_string()]);
        assert!(set.contains("01") && !set.contains("02"));
        set.mark_loaded();
        assert!(set.is_loaded());
    }

    #[test]
    fn subscribers_hear_of_new_serials_only() {
        let set = RevokedSerials::default();
        let mut changes = set.subscribe();
        set.extend(["01".to_string()]);
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        set.extend(["01".to_string()]);
        assert!(!changes.has_changed().unwrap(), "already known");
    }
}
