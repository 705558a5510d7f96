//! The Diesel schema, identical on SQLite and PostgreSQL (see `migrations/`).

diesel::table! {
    devices (id) {
        id -> Text,
        name -> Text,
        labels -> Text,
        spec -> Text,
        acked_version -> Nullable<Text>,
        nacked_version -> Nullable<Text>,
        last_error -> Nullable<Text>,
        agent_version -> Nullable<Text>,
        last_seen_ms -> Nullable<BigInt>,
        cert_serial -> Nullable<Text>,
        cert_not_after_ms -> Nullable<BigInt>,
        created_ms -> BigInt,
        updated_ms -> BigInt,
        fleet -> Nullable<Text>,
        fleet_revision -> Nullable<BigInt>,
        tpm_ek_fingerprint -> Nullable<Text>,
    }
}

diesel::table! {
    device_sessions (device_id) {
        device_id -> Text,
        replica -> Text,
        since_ms -> BigInt,
    }
}

diesel::table! {
    device_reports (device_id) {
        device_id -> Text,
        report -> Text,
        reported_ms -> BigInt,
    }
}

diesel::table! {
    enrollment_requests (name) {
        name -> Text,
        key_fingerprint -> Text,
        csr_pem -> Text,
        labels -> Text,
        system_info -> Text,
        state -> Text,
        reason -> Nullable<Text>,
        device_id -> Nullable<Text>,
        certificate_serial -> Nullable<Text>,
        created_ms -> BigInt,
        decided_ms -> Nullable<BigInt>,
        decided_by -> Nullable<Text>,
        tpm_ek_fingerprint -> Nullable<Text>,
        credential -> Text,
        source_address -> Text,
    }
}

diesel::table! {
    audit_heads (seq) {
        seq -> BigInt,
        hash -> Text,
        at_ms -> BigInt,
        signature -> Text,
    }
}

diesel::table! {
    certificates (serial) {
        serial -> Text,
        device_id -> Text,
        key_fingerprint -> Text,
        fingerprint -> Text,
        certificate_pem -> Text,
        not_before_ms -> BigInt,
        not_after_ms -> BigInt,
        issued_ms -> BigInt,
        revoked_ms -> Nullable<BigInt>,
        revocation_reason -> Nullable<Text>,
    }
}

diesel::table! {
    fleets (name) {
        name -> Text,
        selector -> Text,
        label_defaults -> Text,
        revision -> BigInt,
        created_ms -> BigInt,
        updated_ms -> BigInt,
        rollout_policy -> Nullable<Text>,
    }
}

diesel::table! {
    rollouts (id) {
        id -> Text,
        fleet -> Text,
        from_revision -> BigInt,
        to_revision -> BigInt,
        state -> Text,
        batch -> BigInt,
        members -> Text,
        batch_started_ms -> BigInt,
        reason -> Text,
        created_ms -> BigInt,
        updated_ms -> BigInt,
    }
}

diesel::table! {
    rollout_events (rollout_id, seq) {
        rollout_id -> Text,
        seq -> BigInt,
        at_ms -> BigInt,
        event -> Text,
        detail -> Text,
    }
}

diesel::table! {
    fleet_revisions (fleet, revision) {
        fleet -> Text,
        revision -> BigInt,
        template -> Text,
        created_ms -> BigInt,
        created_by -> Text,
    }
}

diesel::table! {
    certificate_audit (seq) {
        seq -> BigInt,
        at_ms -> BigInt,
        kind -> Text,
        device_id -> Text,
        serial -> Text,
        key_fingerprint -> Text,
        not_before_ms -> BigInt,
        not_after_ms -> BigInt,
        actor -> Text,
        reason -> Text,
        proof -> Text,
        outcome -> Text,
        target -> Text,
        role -> Text,
        method -> Text,
        revision -> Text,
        previous_hash -> Text,
        hash -> Text,
        signature -> Text,
    }
}

diesel::table! {
    credentials (name) {
        name -> Text,
        role -> Text,
        scope -> Text,
        grants -> Text,
        validity_ms -> BigInt,
        created_ms -> BigInt,
        created_by -> Text,
        last_used_ms -> Nullable<BigInt>,
        revoked_ms -> Nullable<BigInt>,
        revocation_reason -> Nullable<Text>,
    }
}

diesel::table! {
    credential_certificates (serial) {
        serial -> Text,
        credential -> Text,
        key_fingerprint -> Text,
        fingerprint -> Text,
        certificate_pem -> Text,
        not_before_ms -> BigInt,
        not_after_ms -> BigInt,
        issued_ms -> BigInt,
        revoked_ms -> Nullable<BigInt>,
        revocation_reason -> Nullable<Text>,
    }
}

diesel::table! {
    tpm_challenges (id) {
        id -> Text,
        name -> Text,
        key_fingerprint -> Text,
        ek_fingerprint -> Text,
        secret_digest -> Text,
        expires_ms -> BigInt,
        created_ms -> BigInt,
    }
}

diesel::table! {
    deployment_identity (key) {
        key -> Text,
        value -> Text,
        created_ms -> BigInt,
    }
}

diesel::table! {
    changes (id) {
        id -> BigInt,
        kind -> Text,
        subject -> Text,
        origin -> Text,
        created_ms -> BigInt,
        facts -> Nullable<Text>,
    }
}

diesel::table! {
    agent_releases (version) {
        version -> Text,
        sha256 -> Text,
        size -> BigInt,
        signature -> Text,
        url -> Text,
        key_fingerprint -> Text,
        published_ms -> BigInt,
        published_by -> Text,
    }
}

diesel::table! {
    artifact_chunks (sha256, seq) {
        sha256 -> Text,
        seq -> Integer,
        data -> Binary,
    }
}

diesel::joinable!(device_sessions -> devices (device_id));
diesel::joinable!(device_reports -> devices (device_id));
diesel::joinable!(credential_certificates -> credentials (credential));

diesel::allow_tables_to_appear_in_same_query!(
    agent_releases,
    artifact_chunks,
    audit_heads,
    certificate_audit,
    changes,
    credential_certificates,
    credentials,
    deployment_identity,
    device_reports,
    device_sessions,
    devices,
    enrollment_requests,
    certificates,
    fleets,
    fleet_revisions,
    rollouts,
    rollout_events,
    tpm_challenges
);
