//! The set of refused certificate serials (revoked or superseded), consulted on every request by
//! the authentication layer and at every session opening and issuance, and updated the moment a
//! certificate is revoked. Loaded from the store at start; until it is, nothing is trusted.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct RevokedSerials {
    serials: RwLock<HashSet<String>>,
    /// The stored revocations are in the set (and the rest of the state is loaded): until then a
    /// certificate cannot be told apart from a revoked one, so no request is served.
    loaded: AtomicBool,
}

impl RevokedSerials {
    pub fn contains(&self, serial: &str) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    pub fn extend(&self, serials: impl IntoIterator<Item = String>) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(serials);
    }

    /// Declares the set complete: the control plane's state is loaded.
    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

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
}
