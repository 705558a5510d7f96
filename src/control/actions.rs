//! Admin calls in the audit trail: who called which method on what, with which outcome. Each
//! mutating use case appends its call's record in the transaction of its change; a refused call
//! appends one on its own. Certificate events a call causes (an issuance at approval, revocations)
//! keep their own records beside it.

use super::{ControlError, ControlPlane};
use crate::audit::{AuditEntry, SignedHead, head_signed_bytes};
use crate::identity::Identity;
use crate::store::Audited;
use std::time::Duration;

/// Who is calling, through which admin method (`FleetService/ApplyFleet`). Internal work (the
/// rollout engine, start-up) has no method and leaves no call record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Who calls.
    pub identity: Identity,
    /// The admin method (`FleetService/ApplyFleet`).
    pub method: String,
}

impl Actor {
    /// The call of `method` by `identity`.
    pub fn new(identity: Identity, method: impl Into<String>) -> Actor {
        Actor {
            identity,
            method: method.into(),
        }
    }

    /// The record of this call succeeding on `target` (`fleet/web`) at `at_ms`.
    pub fn record(&self, at_ms: i64, target: impl Into<String>) -> AuditEntry {
        AuditEntry {
            at_ms,
            kind: call_kind(&self.method).into(),
            actor: self.identity.to_string(),
            role: self.identity.role.kind().into(),
            method: self.method.clone(),
            outcome: "ok".into(),
            target: target.into(),
            ..Default::default()
        }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.identity.fmt(f)
    }
}

/// What an admin method does, as the record's kind: an imperative verb, as Kubernetes audit events
/// name theirs, so a call (`revoke`) is never confused with the certificate event it causes
/// (`revoked`).
pub fn call_kind(method: &str) -> &'static str {
    let name = method.rsplit('/').next().unwrap_or(method);
    match name {
        "ApplyDevice" | "ApplyFleet" => "apply",
        "LabelDevice" => "label",
        "DeleteDevice" | "DeleteFleet" | "DeleteEnrollment" | "DeleteAgentRelease" => "delete",
        "PublishAgentRelease" => "publish",
        "ApproveEnrollment" => "approve",
        "DenyEnrollment" => "deny",
        "PauseRollout" => "pause",
        "ResumeRollout" => "resume",
        "RollbackRollout" => "rollback",
        "RevokeCertificate" | "RevokeCredential" => "revoke",
        "RenewCertificate" | "RenewCredential" | "RenewOwnCredential" => "renew",
        "CreateCredential" => "create",
        _ => "call",
    }
}

/// A call refused before or by its handler: who, which method, why.
#[derive(Debug, Clone)]
pub struct CallRefusal {
    /// Who called.
    pub identity: Identity,
    /// The admin method.
    pub method: String,
    /// Why it was refused.
    pub reason: String,
}

/// How often the chain head is signed and kept.
pub(super) const HEAD_INTERVAL: Duration = Duration::from_secs(60);

impl ControlPlane {
    /// The records of a call, ready to go into the transaction of its change.
    pub(super) fn audited(&self, entries: Vec<AuditEntry>) -> Audited {
        Audited {
            seal: self.seal(),
            entries,
        }
    }

    /// Appends the record of a successful call that changes nothing in the database (a renewal
    /// request, carried out by the devices).
    pub(super) async fn record_call(&self, entry: AuditEntry) -> Result<(), ControlError> {
        self.store.append_audit(self.seal(), entry).await?;
        Ok(())
    }

    /// Appends the record of a refused mutating call. A failure is logged, not returned: the caller
    /// is refused either way.
    pub async fn record_refusal(&self, refusal: CallRefusal) {
        let entry = AuditEntry {
            outcome: "refused".into(),
            reason: refusal.reason,
            ..Actor::new(refusal.identity, refusal.method).record(self.now_millis(), "")
        };
        if let Err(error) = self.store.append_audit(self.seal(), entry).await {
            tracing::warn!(%error, "could not record a refused call in the audit trail");
        }
    }

    /// The chain's last record, signed now.
    pub async fn sign_audit_head(&self) -> Result<SignedHead, ControlError> {
        let (seq, hash) = self.store.audit_chain_head().await?;
        Ok(self.sign_head(seq, hash))
    }

    fn sign_head(&self, seq: i64, hash: String) -> SignedHead {
        let at_ms = self.now_millis();
        let signature = self.audit_key.sign(&head_signed_bytes(seq, &hash, at_ms));
        SignedHead {
            seq,
            hash,
            at_ms,
            signature,
        }
    }

    /// The heads kept periodically, newest first.
    pub async fn list_audit_heads(&self, limit: usize) -> Result<Vec<SignedHead>, ControlError> {
        let limit = if limit == 0 { 100 } else { limit.min(1000) };
        Ok(self.store.list_audit_heads(limit as i64).await?)
    }

    /// Keeps signed heads while this replica leads, every `audit_head_interval`.
    pub async fn run_audit_head_keeper(&self) {
        let mut interval = tokio::time::interval(self.policy.audit_head_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_kept = 0;
        loop {
            interval.tick().await;
            if self.leading.load(std::sync::atomic::Ordering::Acquire) {
                self.keep_audit_head(&mut last_kept).await;
            }
        }
    }

    /// Signs and keeps the head when it moved since the last one kept, and logs it (a log shipped
    /// off the host is a copy of the head an attacker with the database cannot change).
    pub(super) async fn keep_audit_head(&self, last_kept: &mut i64) {
        let (seq, hash) = match self.store.audit_chain_head().await {
            Ok(head) => head,
            Err(error) => {
                tracing::warn!(%error, "could not read the audit head");
                return;
            }
        };
        // Signed only when it moved: an idle trail costs one read per interval.
        if seq == *last_kept || seq == 0 {
            return;
        }
        let head = self.sign_head(seq, hash.clone());
        let at_ms = head.at_ms;
        match self.store.save_audit_head(head).await {
            Ok(()) => {
                *last_kept = seq;
                tracing::info!(audit.seq = seq, audit.hash = %hash, at_ms, "audit head signed");
            }
            Err(error) => tracing::warn!(%error, "could not keep the audit head"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    #[test]
    fn a_call_record_names_actor_role_method_and_target() {
        let actor = Actor::new(
            Identity::new(Role::Operator, "alice"),
            "FleetService/ApplyFleet",
        );
        let entry = actor.record(1_000, "fleet/web");
        assert_eq!(entry.actor, "operator/alice");
        assert_eq!(entry.role, "operator");
        assert_eq!(entry.kind, "apply");
        assert_eq!(entry.target, "fleet/web");
        assert_eq!(entry.outcome, "ok");
        assert_eq!(entry.encoding(), 3);
        assert_eq!(call_kind("RolloutService/RollbackRollout"), "rollback");
        assert_eq!(
            call_kind("flotilla.admin.v1.DeviceService/LabelDevice"),
            "label"
        );
    }
}
