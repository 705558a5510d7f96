//! The set of revoked certificate serials, consulted on every request by the authentication layer
//! and updated the moment a certificate is revoked. Loaded from the store at start.

use std::collections::HashSet;
use std::sync::RwLock;

#[derive(Debug, Default)]
pub struct RevokedSerials {
    serials: RwLock<HashSet<String>>,
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
}
