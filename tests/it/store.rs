//! The store on a real database: SQLite by default, PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set
//! (`.ci/run` runs the suite both ways).

use crate::support;

use flotilla::audit::{AuditEntry, verify_chain};
use flotilla::ca::audit_key::AuditKey;
use flotilla::spec::{DeviceSpec, FileSpec};
use flotilla::store::{AuditQuery, AuditSeal, Audited, FleetRollout, IssuanceRules, Revocation};
use flotilla::store::{
    Backend, CertificateRecord, DeviceChange, DeviceOwner, EnrollmentState, FleetWrite, NewDevice,
    NewEnrollment, Store, StoreError, SystemInfo,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use support::test_store;

fn enrollment(name: &str, key: &str) -> NewEnrollment {
    NewEnrollment {
        name: name.into(),
        key_fingerprint: key.into(),
        csr_pem: "csr".into(),
        labels: BTreeMap::from([("site".to_string(), "berlin".to_string())]),
        system_info: SystemInfo {
            hostname: "h".into(),
            ..Default::default()
        },
        created_ms: 1,
        tpm_ek_fingerprint: None,
        credential: "factory".into(),
        source_address: "127.0.0.1:1".into(),
    }
}

fn device(id: &str, name: &str) -> NewDevice {
    NewDevice {
        id: id.into(),
        name: name.into(),
        labels: BTreeMap::new(),
        spec: DeviceSpec::default(),
        cert_serial: format!("serial-{id}"),
        cert_not_after_ms: 10,
        created_ms: 2,
        fleet: None,
        tpm_ek_fingerprint: None,
    }
}

/// No admin call's records (the store's own still appear).
fn audited(entries: Vec<AuditEntry>) -> Audited {
    Audited {
        seal: seal(),
        entries,
    }
}

fn seal() -> Arc<dyn AuditSeal> {
    Arc::new(AuditKey::generate().unwrap().0)
}

fn issued(device: &str) -> AuditEntry {
    AuditEntry {
        kind: "issued".into(),
        device_id: device.into(),
        outcome: "ok".into(),
        ..Default::default()
    }
}

/// A migrated store on a database of its own on the test PostgreSQL, as `replica`; the database
/// lives as long as the returned `TestDb`.
async fn postgres_store_as(replica: &'static str) -> (support::TestDb, Store) {
    let db = support::TestDb::postgres_for_tests();
    let backend = db.backend();
    let store = tokio::task::spawn_blocking(move || Store::open_as(backend, replica))
        .await
        .unwrap()
        .unwrap();
    store.migrate().await.unwrap();
    (db, store)
}

/// Stores of two replicas, "a" and "b", on one new PostgreSQL database.
async fn two_postgres_replicas() -> (support::TestDb, Store, Store) {
    let (db, store) = postgres_store_as("a").await;
    let backend = db.backend();
    let other = tokio::task::spawn_blocking(move || Store::open_as(backend, "b"))
        .await
        .unwrap()
        .unwrap();
    (db, store, other)
}

fn certificate(id: &str) -> CertificateRecord {
    CertificateRecord {
        serial: format!("serial-{id}"),
        device_id: id.into(),
        key_fingerprint: "k".into(),
        fingerprint: "f".into(),
        certificate_pem: "pem".into(),
        not_before_ms: 1,
        not_after_ms: 10,
        issued_ms: 2,
        revoked_ms: None,
        revocation_reason: None,
    }
}

#[tokio::test]
async fn enrollment_lifecycle_is_idempotent_and_atomic() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _db) = test_store(tmp.path()).await;

    let first = store
        .submit_enrollment(enrollment("dev", "key-1"))
        .await
        .unwrap();
    assert_eq!(first.state, EnrollmentState::Pending);
    let again = store
        .submit_enrollment(enrollment("dev", "key-1"))
        .await
        .unwrap();
    assert_eq!(again, first, "re-submission returns the same request");
    assert!(matches!(
        store.submit_enrollment(enrollment("dev", "key-2")).await,
        Err(StoreError::Conflict(_))
    ));

    let approved = store
        .approve_enrollment(
            "dev",
            device("d1", "dev"),
            certificate("d1"),
            "admin/admin".into(),
            audited(vec![issued("d1")]),
        )
        .await
        .unwrap();
    assert_eq!(approved.state, EnrollmentState::Approved);
    assert_eq!(approved.device_id.as_deref(), Some("d1"));
    assert_eq!(approved.certificate_serial.as_deref(), Some("serial-d1"));
    assert_eq!(
        store
            .get_certificate("serial-d1")
            .await
            .unwrap()
            .unwrap()
            .device_id,
        "d1"
    );
    assert!(matches!(
        store
            .approve_enrollment(
                "dev",
                device("d2", "dev"),
                certificate("d2"),
                "x".into(),
                audited(vec![issued("d2")])
            )
            .await,
        Err(StoreError::Precondition(_))
    ));

    // A failing approval (the device name is taken) leaves the request pending and nothing behind.
    store
        .submit_enrollment(enrollment("other", "key-3"))
        .await
        .unwrap();
    let clash = store
        .approve_enrollment(
            "other",
            device("d3", "dev"),
            certificate("d3"),
            "x".into(),
            audited(vec![issued("d3")]),
        )
        .await;
    assert!(matches!(clash, Err(StoreError::Conflict(_))), "{clash:?}");
    assert_eq!(
        store.get_enrollment("other").await.unwrap().unwrap().state,
        EnrollmentState::Pending
    );
    assert!(store.get_certificate("serial-d3").await.unwrap().is_none());

    let denied = store
        .deny_enrollment(
            "other",
            "no".into(),
            "admin/admin".into(),
            5,
            audited(vec![]),
        )
        .await
        .unwrap();
    assert_eq!(denied.state, EnrollmentState::Denied);
    let pending = store
        .list_enrollments(Some(EnrollmentState::Pending))
        .await
        .unwrap();
    assert!(pending.is_empty());
    assert_eq!(store.list_enrollments(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn device_specs_labels_and_sync_facts_persist() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _db) = test_store(tmp.path()).await;
    store
        .submit_enrollment(enrollment("dev", "key"))
        .await
        .unwrap();
    store
        .approve_enrollment(
            "dev",
            device("d1", "dev"),
            certificate("d1"),
            "a".into(),
            audited(vec![issued("d1")]),
        )
        .await
        .unwrap();

    let mut file = FileSpec::new("/etc/x", "x");
    file.mode = 0o600;
    file.owner = Some("root".into());
    let spec = DeviceSpec {
        files: vec![file],
        ..Default::default()
    };
    let labels = BTreeMap::from([("tier".to_string(), "edge".to_string())]);
    let change = DeviceChange {
        spec: Some(spec.clone()),
        labels: Some(labels.clone()),
        fleet: Some(Some("edge".into())),
        fleet_revision: Some(Some(3)),
    };
    let updated = store
        .update_device("dev", change, 7, audited(vec![]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.spec, spec);
    assert_eq!(updated.labels, labels);
    assert_eq!(updated.fleet.as_deref(), Some("edge"));
    assert_eq!(updated.fleet_revision, Some(3));
    let change = DeviceChange {
        spec: Some(DeviceSpec::default()),
        ..Default::default()
    };
    let kept = store
        .update_device("dev", change, 8, audited(vec![]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.labels, labels, "labels kept when not given");
    assert_eq!(
        kept.fleet.as_deref(),
        Some("edge"),
        "owner kept when not given"
    );
    let cleared = DeviceChange {
        fleet: Some(None),
        ..Default::default()
    };
    let kept = store
        .update_device("dev", cleared, 9, audited(vec![]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.fleet, None);
    assert!(
        store
            .update_device("ghost", DeviceChange::default(), 9, audited(vec![]))
            .await
            .unwrap()
            .is_none()
    );

    store
        .record_device_sync(
            "d1",
            Some("v1".into()),
            Some(("v2".into(), "disk full".into())),
        )
        .await
        .unwrap();
    store
        .record_device_session("d1", "0.1.0".into(), None, 11)
        .await
        .unwrap();
    let device = store.get_device_by_name("dev").await.unwrap().unwrap();
    assert_eq!(device.acked_version.as_deref(), Some("v1"));
    assert_eq!(device.nacked, Some(("v2".into(), "disk full".into())));
    assert_eq!(device.agent_version.as_deref(), Some("0.1.0"));
    assert_eq!(device.last_seen_ms, Some(11));
    assert_eq!(store.list_devices().await.unwrap().len(), 1);
}

fn fleet_write(template: &str) -> FleetWrite {
    FleetWrite {
        name: "web".into(),
        selector: "role=web".into(),
        label_defaults: BTreeMap::from([("site".to_string(), "lab".to_string())]),
        template: DeviceSpec {
            files: vec![FileSpec::new("/etc/web", template)],
            ..Default::default()
        },
        rollout: None,
        actor: "admin/admin".into(),
        now_ms: 5,
    }
}

#[tokio::test]
async fn fleet_templates_are_immutable_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _db) = test_store(tmp.path()).await;
    store
        .submit_enrollment(enrollment("dev", "key"))
        .await
        .unwrap();
    store
        .approve_enrollment(
            "dev",
            device("d1", "dev"),
            certificate("d1"),
            "a".into(),
            audited(vec![issued("d1")]),
        )
        .await
        .unwrap();

    let created = store
        .apply_fleet(
            fleet_write("one"),
            vec![("d1".into(), Some("web".into()))],
            FleetRollout::default(),
            audited(vec![]),
        )
        .await
        .unwrap();
    assert_eq!(created.revision, 1);
    assert_eq!(created.label_defaults["site"], "lab");
    let owner = store
        .get_device_by_name("dev")
        .await
        .unwrap()
        .unwrap()
        .fleet;
    assert_eq!(
        owner.as_deref(),
        Some("web"),
        "owners move in the same transaction"
    );

    let same = store
        .apply_fleet(
            fleet_write("one"),
            vec![],
            FleetRollout::default(),
            audited(vec![]),
        )
        .await
        .unwrap();
    assert_eq!(
        same.revision, 1,
        "an identical template is not a new revision"
    );
    let mut reselected = fleet_write("one");
    reselected.selector = "role=web,site=berlin".into();
    let reselected = store
        .apply_fleet(reselected, vec![], FleetRollout::default(), audited(vec![]))
        .await
        .unwrap();
    assert_eq!(
        (reselected.revision, reselected.selector.as_str()),
        (1, "role=web,site=berlin")
    );
    let changed = store
        .apply_fleet(
            fleet_write("two"),
            vec![],
            FleetRollout::default(),
            audited(vec![]),
        )
        .await
        .unwrap();
    assert_eq!(changed.revision, 2);
    assert_eq!(changed.template.files[0].content, "two");

    let revisions = store.list_fleet_revisions("web").await.unwrap();
    let contents: Vec<(i64, &str)> = revisions
        .iter()
        .map(|r| (r.revision, r.template.files[0].content.as_str()))
        .collect();
    assert_eq!(contents, [(1, "one"), (2, "two")]);
    assert_eq!(store.list_fleets().await.unwrap(), vec![changed.clone()]);
    assert_eq!(store.get_fleet("web").await.unwrap(), Some(changed));

    assert!(
        store
            .delete_fleet("web", vec![], audited(vec![]))
            .await
            .unwrap()
    );
    assert!(
        !store
            .delete_fleet("web", vec![], audited(vec![]))
            .await
            .unwrap()
    );
    assert!(store.list_fleet_revisions("web").await.unwrap().is_empty());
    let owner = store
        .get_device_by_name("dev")
        .await
        .unwrap()
        .unwrap()
        .fleet;
    assert_eq!(owner, None, "no device points at a deleted fleet");
    let again = store
        .apply_fleet(
            fleet_write("three"),
            vec![],
            FleetRollout::default(),
            audited(vec![]),
        )
        .await
        .unwrap();
    assert_eq!(again.revision, 1, "a re-created fleet starts over");
}

#[tokio::test]
async fn certificates_revocations_and_the_audit_trail() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _db) = test_store(tmp.path()).await;
    let (key, _) = AuditKey::generate().unwrap();
    let key: Arc<AuditKey> = Arc::new(key);
    let seal: Arc<dyn AuditSeal> = key.clone();
    store
        .submit_enrollment(enrollment("dev", "key"))
        .await
        .unwrap();
    store
        .approve_enrollment(
            "dev",
            device("d1", "dev"),
            certificate("d1"),
            "a".into(),
            Audited {
                seal: seal.clone(),
                entries: vec![issued("d1")],
            },
        )
        .await
        .unwrap();
    let mut renewed = certificate("d1");
    renewed.serial = "serial-2".into();
    renewed.key_fingerprint = "k2".into();
    renewed.not_after_ms = 20;
    let mut entry = issued("d1");
    entry.kind = "renewed".into();
    store
        .record_issuance(
            renewed.clone(),
            seal.clone(),
            entry,
            IssuanceRules {
                renews: Some("serial-d1".into()),
            },
        )
        .await
        .unwrap();
    let device = store.get_device_by_name("dev").await.unwrap().unwrap();
    assert_eq!(device.cert_serial.as_deref(), Some("serial-2"));
    assert_eq!(device.cert_not_after_ms, Some(20));
    assert_eq!(
        store.find_certificate_for_key("d1", "k2").await.unwrap(),
        Some(renewed)
    );
    assert_eq!(
        store.find_certificate_for_key("d1", "k9").await.unwrap(),
        None
    );

    let revocation = Revocation {
        serials: vec!["serial-d1".into(), "serial-d1".into()],
        reason: "lost".into(),
        actor: "admin/admin".into(),
        now_ms: 30,
        ..Default::default()
    };
    let revoked = store
        .revoke_certificates(
            revocation,
            Audited {
                seal: seal.clone(),
                entries: vec![],
            },
        )
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1, "revoking twice records it once");
    assert_eq!(store.revoked_serials().await.unwrap(), ["serial-d1"]);

    let deleted = store
        .delete_device(
            "d1",
            Revocation {
                serials: vec!["serial-2".into()],
                reason: "decommissioned".into(),
                actor: "admin/admin".into(),
                now_ms: 40,
                ..Default::default()
            },
            Audited {
                seal: seal.clone(),
                entries: vec![],
            },
        )
        .await
        .unwrap();
    assert_eq!(deleted.len(), 1);
    assert!(store.get_device_by_name("dev").await.unwrap().is_none());
    assert!(
        store.get_enrollment("dev").await.unwrap().is_none(),
        "the name can enroll again"
    );
    assert_eq!(
        store
            .list_certificates(Some("d1".into()))
            .await
            .unwrap()
            .len(),
        2
    );

    let all = store
        .list_audit(AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = all.iter().map(|r| r.entry.kind.as_str()).collect();
    assert_eq!(kinds, ["issued", "renewed", "revoked", "revoked"]);
    assert_eq!(verify_chain(&all, &key.public_key_der()), Ok(4));
    let page = store
        .list_audit(AuditQuery {
            kind: Some("revoked".into()),
            after_seq: 3,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].entry.seq, 4);
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _db) = test_store(tmp.path()).await;
    assert_eq!(store.migrate().await.unwrap(), 0);
}

#[test]
fn an_unreachable_postgres_is_a_clear_error_not_a_sqlite_file() {
    let url = "postgres://nobody@127.0.0.1:1/none";
    let error = Store::open(Backend::from_url(url)).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
    assert!(
        error.to_string().contains("database unavailable"),
        "{error}"
    );
    assert!(!std::path::Path::new(url).exists());
}

/// On PostgreSQL (the only backend with a change feed): what a device answered and where its
/// session is travel as `session` changes, re-read narrowly; what renders it as `device` changes.
#[tokio::test]
async fn the_feed_tells_session_facts_from_device_changes() {
    use flotilla::store::{ChangeKind, DeviceFact, FeedLane};
    let (_db, store) = postgres_store_as("a").await;
    store
        .insert_devices(
            vec![(device("d1", "dev"), certificate("d1"))],
            seal(),
            "t".into(),
        )
        .await
        .unwrap();
    let kinds_after = |after: i64| {
        let store = store.clone();
        async move {
            let changes = store.changes_after(after, 100, None).await.unwrap();
            let last = changes.last().map_or(after, |c| c.id);
            let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind).collect();
            assert!(changes.iter().all(|c| c.subject == "d1"));
            (kinds, last)
        }
    };
    let (kinds, mut at) = kinds_after(0).await;
    assert_eq!(kinds, [ChangeKind::Device], "created");

    store
        .record_device_facts(vec![DeviceFact::Session {
            id: "d1".into(),
            agent_version: "1.0".into(),
            running_version: None,
            seen_ms: 5,
        }])
        .await
        .unwrap();
    let (kinds, next) = kinds_after(at).await;
    assert!(!kinds.is_empty(), "a session start is a change");
    assert!(kinds.iter().all(|k| *k == ChangeKind::Session), "{kinds:?}");
    at = next;

    store
        .record_device_facts(vec![DeviceFact::Sync {
            id: "d1".into(),
            acked_version: Some("v1".into()),
            nacked: None,
        }])
        .await
        .unwrap();
    let (kinds, next) = kinds_after(at).await;
    assert_eq!(kinds, [ChangeKind::Session], "an ACK is a session fact");
    at = next;

    store
        .record_device_facts(vec![DeviceFact::LastSeen {
            id: "d1".into(),
            seen_ms: 9,
        }])
        .await
        .unwrap();
    let facts = store
        .session_facts(vec!["d1".into(), "gone".into()])
        .await
        .unwrap();
    assert_eq!(facts.len(), 1, "unknown devices are left out");
    assert_eq!(facts[0].acked_version.as_deref(), Some("v1"));
    assert_eq!(facts[0].agent_version.as_deref(), Some("1.0"));
    assert_eq!(facts[0].session_replica, None, "the session ended");
    let (kinds, next) = kinds_after(at).await;
    assert_eq!(
        kinds,
        [ChangeKind::Session],
        "the session's end, not the heartbeat"
    );
    at = next;

    let change = DeviceChange {
        labels: Some(BTreeMap::from([("tier".to_string(), "edge".to_string())])),
        ..Default::default()
    };
    store
        .update_device("dev", change, 10, audited(vec![]))
        .await
        .unwrap()
        .unwrap();
    let (kinds, _) = kinds_after(at).await;
    assert_eq!(kinds, [ChangeKind::Device], "labels render the device");

    // Each lane holds its kinds only, in id order, and together they hold the whole feed.
    let all = store.changes_after(0, 100, None).await.unwrap();
    let sessions = store
        .changes_after(0, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    let others = store
        .changes_after(0, 100, Some(FeedLane::Others))
        .await
        .unwrap();
    assert!(sessions.iter().all(|c| c.kind == ChangeKind::Session));
    assert!(others.iter().all(|c| c.kind != ChangeKind::Session));
    assert!(!sessions.is_empty() && !others.is_empty());
    let mut merged: Vec<i64> = sessions.iter().chain(&others).map(|c| c.id).collect();
    merged.sort_unstable();
    assert_eq!(merged, all.iter().map(|c| c.id).collect::<Vec<_>>());
    assert!(sessions.windows(2).all(|w| w[0].id < w[1].id));
}

/// `count` devices `device-00000`, `device-00001`, …, each with a certificate; their ids.
async fn insert_numbered_devices(store: &Store, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|i| format!("device-{i:05}")).collect();
    let named: Vec<&str> = ids.iter().map(String::as_str).collect();
    insert_devices_named(store, &named).await;
    ids
}

/// Devices `ids`, each named `dev-<id>`, with a certificate.
async fn insert_devices_named(store: &Store, ids: &[&str]) {
    store
        .insert_devices(
            ids.iter()
                .map(|id| (device(id, &format!("dev-{id}")), certificate(id)))
                .collect(),
            seal(),
            "t".into(),
        )
        .await
        .unwrap();
}

/// On PostgreSQL a fleet's owners are written at once: every device ends with the owner the list
/// gives it last, whatever the list's order, and the feed gets one `device` change for each device
/// that moved (a row per thousand of them) and none for a device whose owner stayed.
#[tokio::test]
async fn owners_written_at_once_move_each_device_and_feed_each_move() {
    use flotilla::store::{ChangeKind, FeedLane};
    let (_db, store, other) = two_postgres_replicas().await;
    let ids: Vec<String> = (0..1200).map(|i| format!("device-{i:04}")).collect();
    let named: Vec<&str> = ids.iter().map(String::as_str).collect();
    insert_devices_named(&store, &named).await;
    let owner_before = |i: usize| i.is_multiple_of(3).then(|| "web".to_string());
    store
        .set_device_owners(
            ids.iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), owner_before(i)))
                .collect(),
        )
        .await
        .unwrap();
    let owner_after = |i: usize| match i {
        1 => Some("db".to_string()),
        _ => i.is_multiple_of(2).then(|| "web".to_string()),
    };
    let mut owners: Vec<(String, Option<String>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i.is_multiple_of(2).then(|| "web".to_string())))
        .rev()
        .collect();
    owners.push((ids[1].clone(), Some("db".into())));
    let before = other.latest_change_id().await.unwrap();
    store.set_device_owners(owners).await.unwrap();

    let devices = store.get_devices(ids.clone()).await.unwrap();
    assert_eq!(devices.len(), ids.len());
    for device in &devices {
        let i: usize = device.id["device-".len()..].parse().unwrap();
        assert_eq!(device.fleet, owner_after(i), "owner of {}", device.id);
    }
    let changes = other
        .changes_after(before, 10_000, Some(FeedLane::Others))
        .await
        .unwrap();
    assert!(changes.iter().all(|c| c.kind == ChangeKind::Device));
    let mut moved: Vec<&str> = changes.iter().map(|c| c.subject.as_str()).collect();
    moved.sort_unstable();
    let expected: Vec<&str> = (0..ids.len())
        .filter(|&i| owner_before(i) != owner_after(i))
        .map(|i| ids[i].as_str())
        .collect();
    assert_eq!(moved, expected);
    // Every replica reads every change: the moves share a change row per thousand devices.
    let mut rows: Vec<i64> = changes.iter().map(|c| c.id).collect();
    rows.dedup();
    assert_eq!(rows.len(), expected.len().div_ceil(1000));
    assert_eq!(
        other.latest_change_id().await.unwrap() - before,
        rows.len() as i64
    );
    // Each change carries the owner it committed, so the other replicas need not re-read.
    for change in &changes {
        let i: usize = change.subject["device-".len()..].parse().unwrap();
        assert_eq!(
            change.moved_to,
            Some(DeviceOwner {
                fleet: owner_after(i),
                revision: None
            }),
            "owner carried for {}",
            change.subject
        );
    }
    // The replica that wrote them applies nothing of its own.
    let own = store
        .changes_after(before, 10_000, Some(FeedLane::Others))
        .await
        .unwrap();
    assert!(own.iter().all(|c| c.own && c.moved_to.is_none()));
}

/// A device change beyond its owner (labels, spec) carries nothing: the other replicas re-read
/// the device. A pinned revision alone is carried like an owner.
#[tokio::test]
async fn only_a_move_alone_is_carried_in_the_feed() {
    use flotilla::store::{ChangeKind, FeedLane};
    let (_db, store, other) = two_postgres_replicas().await;
    insert_devices_named(&store, &["d"]).await;
    let before = other.latest_change_id().await.unwrap();
    let relabelled = DeviceChange {
        labels: Some(BTreeMap::from([("tier".to_string(), "edge".to_string())])),
        fleet: Some(Some("edge".into())),
        ..Default::default()
    };
    store
        .update_device("dev-d", relabelled, 7, audited(vec![]))
        .await
        .unwrap()
        .unwrap();
    let pinned = DeviceChange {
        fleet_revision: Some(Some(4)),
        ..Default::default()
    };
    store
        .update_device("dev-d", pinned, 8, audited(vec![]))
        .await
        .unwrap()
        .unwrap();
    let changes: Vec<_> = other
        .changes_after(before, 100, Some(FeedLane::Others))
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.kind == ChangeKind::Device)
        .collect();
    let carried: Vec<Option<DeviceOwner>> = changes.iter().map(|c| c.moved_to.clone()).collect();
    assert_eq!(
        carried,
        [
            None,
            Some(DeviceOwner {
                fleet: Some("edge".into()),
                revision: Some(4)
            })
        ]
    );
}

/// On PostgreSQL the journal writes the change rows of its bulk statements itself, one INSERT for
/// the batch: every device gets its `session` change, exactly once, as this replica's; a device with
/// several facts in the batch is written one by one and still recorded by the triggers.
#[tokio::test]
async fn a_bulk_batch_records_one_session_change_per_device() {
    use flotilla::store::{ChangeKind, DeviceFact, FeedLane};
    let (_db, store) = postgres_store_as("a").await;
    let ids = ["b1", "b2", "b3", "s1"];
    insert_devices_named(&store, &ids).await;
    let before = store.latest_change_id().await.unwrap();
    let session = |id: &str| DeviceFact::Session {
        id: id.into(),
        agent_version: "1.0".into(),
        running_version: Some("v0".into()),
        seen_ms: 5,
    };
    let ack = |id: &str| DeviceFact::Sync {
        id: id.into(),
        acked_version: Some("v1".into()),
        nacked: None,
    };
    store
        .record_device_facts(vec![
            session("b1"),
            ack("b2"),
            session("s1"),
            ack("s1"),
            ack("b3"),
            session("gone"),
        ])
        .await
        .unwrap();
    let changes = store
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    assert!(changes.iter().all(|c| c.kind == ChangeKind::Session));
    assert!(changes.iter().all(|c| c.own), "recorded as this replica's");
    let mut subjects: Vec<&str> = changes.iter().map(|c| c.subject.as_str()).collect();
    let bulk: Vec<&str> = subjects
        .iter()
        .copied()
        .filter(|s| s.starts_with('b'))
        .collect();
    assert_eq!(
        bulk,
        ["b1", "b2", "b3"],
        "each bulk device once, in id order"
    );
    assert!(subjects.contains(&"s1"), "the one-by-one device too");
    subjects.sort_unstable();
    subjects.dedup();
    assert_eq!(
        subjects,
        ["b1", "b2", "b3", "s1"],
        "nothing for an unknown device"
    );
    let facts = store
        .session_facts(ids.iter().map(|id| id.to_string()).collect())
        .await
        .unwrap();
    for facts in facts {
        let expected = if facts.id == "b1" { "v0" } else { "v1" };
        assert_eq!(
            facts.acked_version.as_deref(),
            Some(expected),
            "{}",
            facts.id
        );
    }

    // The triggers' exemption ends with the batch's transaction: a later batch written one by
    // one (two answers of one device) is recorded by them, once per answer.
    let answer = |version: &str| DeviceFact::Sync {
        id: "b1".into(),
        acked_version: Some(version.into()),
        nacked: None,
    };
    store
        .record_device_facts(vec![answer("v2"), answer("v3")])
        .await
        .unwrap();
    let last = changes.last().unwrap().id;
    let after = store
        .changes_after(last, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|c| c.subject.as_str()).collect::<Vec<_>>(),
        ["b1", "b1"],
        "each answer, through the trigger"
    );
}

/// Every replica reads every change, so the devices of one bulk batch share a change row (up to a
/// thousand each) rather than each writing one; another replica still reads one change per
/// device, with the facts it committed.
#[tokio::test]
async fn a_bulk_batch_shares_a_change_row_per_thousand_devices() {
    use flotilla::store::{DeviceFact, FeedLane};
    let (_db, store, other) = two_postgres_replicas().await;
    let ids = insert_numbered_devices(&store, 2500).await;
    let before = other.latest_change_id().await.unwrap();
    store
        .record_device_facts(
            ids.iter()
                .map(|id| DeviceFact::Sync {
                    id: id.clone(),
                    acked_version: Some(format!("v-{id}")),
                    nacked: None,
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        other.latest_change_id().await.unwrap() - before,
        3,
        "2,500 devices in three rows"
    );
    let changes = other
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    let subjects: Vec<&str> = changes.iter().map(|c| c.subject.as_str()).collect();
    assert_eq!(subjects, ids, "one change per device, in id order");
    for change in &changes {
        let facts = change.facts.as_ref().expect("facts carried");
        assert_eq!(facts.id, change.subject);
        assert_eq!(
            facts.acked_version.as_deref(),
            Some(format!("v-{}", change.subject).as_str())
        );
    }
    let mut rows: Vec<i64> = changes.iter().map(|c| c.id).collect();
    rows.dedup();
    assert_eq!(rows.len(), 3);
    // The replica that wrote them reads its own devices' changes, with nothing to apply.
    let own = store
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    assert_eq!(own.len(), ids.len());
    assert!(own.iter().all(|c| c.own && c.facts.is_none()));
}

/// A batch's session change whose facts cannot be read (a newer or damaged writer) is not lost:
/// it reads as one change of no device, which has every device's session facts re-read.
#[tokio::test]
async fn an_unreadable_batch_of_session_facts_reads_as_a_change_of_every_device() {
    use diesel::prelude::*;
    use flotilla::store::{ALL_DEVICES, ChangeKind, FeedLane};
    let (db, _store, other) = two_postgres_replicas().await;
    let before = other.latest_change_id().await.unwrap();
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        diesel::sql_query(
            "INSERT INTO changes (kind, subject, origin, created_ms, facts) VALUES \
             ('session', '', 'a', 1, '[{\"acked\": \"v1\"}]'), ('session', '', 'a', 1, 'not json')",
        )
        .execute(&mut conn)
        .unwrap();
    })
    .await
    .unwrap();
    let changes = other
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    assert_eq!(changes.len(), 2);
    for change in changes {
        assert_eq!(change.kind, ChangeKind::Session);
        assert_eq!(change.subject, ALL_DEVICES);
        assert!(!change.own);
        assert_eq!(change.facts, None);
    }
}

/// The devices table's statistics: scans, rows inserted, rows updated and of those updated in
/// place (HOT: on the same page, no index touched).
#[derive(diesel::QueryableByName, Debug, Clone, Copy)]
struct DeviceTableStats {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq_scan: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n_tup_ins: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n_tup_upd: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n_tup_hot_upd: i64,
}

/// The devices table's statistics once they show at least `inserted` inserts and `updated`
/// updates: table statistics reach the view when a backend flushes them (within seconds of going
/// idle). The table is analysed then, so the planner sees it as it is (as a fleet's long-lived
/// table is seen).
async fn device_table_stats(url: &str, inserted: i64, updated: i64) -> DeviceTableStats {
    use diesel::prelude::*;
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let stats: DeviceTableStats = diesel::sql_query(
                "SELECT COALESCE(seq_scan, 0) AS seq_scan, COALESCE(n_tup_ins, 0) AS n_tup_ins, \
                 COALESCE(n_tup_upd, 0) AS n_tup_upd, COALESCE(n_tup_hot_upd, 0) AS n_tup_hot_upd \
                 FROM pg_stat_user_tables WHERE relname = 'devices'",
            )
            .get_result(&mut conn)
            .unwrap();
            if stats.n_tup_ins >= inserted && stats.n_tup_upd >= updated {
                diesel::sql_query("ANALYZE devices")
                    .execute(&mut conn)
                    .unwrap();
                return stats;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "statistics never showed {inserted} inserts and {updated} updates"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    })
    .await
    .unwrap()
}

/// A journal batch finds its devices by their key. At PostgreSQL's default cost of a random page,
/// a batch of 2.5 % of the devices was planned as three scans of the whole table (its lock, its
/// update, its change row); the store's connections tell the planner that pages are cached.
#[tokio::test]
async fn a_journal_batch_finds_its_devices_by_key_not_by_scanning_the_table() {
    use flotilla::store::DeviceFact;
    let (db, store) = postgres_store_as("a").await;
    let ids = insert_numbered_devices(&store, 20_000).await;
    let before = device_table_stats(&db.url, 20_000, 0).await;
    store
        .record_device_facts(
            ids.iter()
                .step_by(40)
                .map(|id| DeviceFact::Sync {
                    id: id.clone(),
                    acked_version: Some("v1".into()),
                    nacked: None,
                })
                .collect(),
        )
        .await
        .unwrap();
    let after = device_table_stats(&db.url, 20_000, before.n_tup_upd + 500).await;
    assert_eq!(
        after.seq_scan, before.seq_scan,
        "a batch of 500 answers scanned the devices table"
    );
}

/// A fleet's new owners are written in place: no index covers a device's owner, so moving a
/// whole fleet rewrites each row on its own page and touches none of the table's indexes (with
/// an index on the owner, each of the fleet's rows went to a new place with an entry in every
/// index, seven times the database's work of a fleet's creation at 100,000 devices).
#[tokio::test]
async fn a_fleet_s_new_owners_are_written_in_place() {
    let (db, store) = postgres_store_as("a").await;
    let ids = insert_numbered_devices(&store, 2_000).await;
    let before = device_table_stats(&db.url, 2_000, 0).await;
    store
        .set_device_owners(
            ids.iter()
                .map(|id| (id.clone(), Some("web".into())))
                .collect(),
        )
        .await
        .unwrap();
    let after = device_table_stats(&db.url, 2_000, before.n_tup_upd + 2_000).await;
    assert_eq!(after.n_tup_upd - before.n_tup_upd, 2_000);
    assert_eq!(
        after.n_tup_hot_upd - before.n_tup_hot_upd,
        2_000,
        "every new owner written in place"
    );
}

/// Sessions that end in one batch (a drain, a replica's shutdown) are written by one statement
/// per kind: each device's last-seen time is set, the sessions this replica held are cleared (a
/// newer one on another replica stays), and each device gets one session change carrying who
/// holds its session now.
#[tokio::test]
async fn session_ends_are_written_at_once_and_carry_who_holds_the_session_now() {
    use flotilla::store::{ChangeKind, DeviceFact, FeedLane};
    let (_db, store, other) = two_postgres_replicas().await;
    let ids = ["e1", "e2", "moved"];
    insert_devices_named(&store, &ids).await;
    let start = |id: &str| DeviceFact::Session {
        id: id.into(),
        agent_version: "1.0".into(),
        running_version: None,
        seen_ms: 1,
    };
    store
        .record_device_facts(ids.iter().map(|id| start(id)).collect())
        .await
        .unwrap();
    // This device reconnected to replica b before its old session's end was written.
    other
        .record_device_facts(vec![start("moved")])
        .await
        .unwrap();
    let before = other.latest_change_id().await.unwrap();
    store
        .record_device_facts(
            ids.iter()
                .map(|id| DeviceFact::LastSeen {
                    id: id.to_string(),
                    seen_ms: 9,
                })
                .collect(),
        )
        .await
        .unwrap();

    let devices = store
        .get_devices(ids.iter().map(|id| id.to_string()).collect())
        .await
        .unwrap();
    assert_eq!(devices.len(), ids.len());
    for device in &devices {
        assert_eq!(device.last_seen_ms, Some(9), "{}", device.id);
        let holder = (device.id == "moved").then_some(other.replica());
        assert_eq!(device.session_replica.as_deref(), holder, "{}", device.id);
    }
    let changes = other
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    let carried: Vec<(&str, Option<&str>)> = changes
        .iter()
        .map(|change| {
            assert_eq!(change.kind, ChangeKind::Session);
            let facts = change.facts.as_ref().expect("the change carries its facts");
            (change.subject.as_str(), facts.session_replica.as_deref())
        })
        .collect();
    assert_eq!(
        carried,
        [("e1", None), ("e2", None), ("moved", Some(other.replica()))]
    );
}

/// The session changes the journal writes in bulk carry the facts they commit, so another
/// replica need not re-read the device: the same facts a re-read gives, except for a device whose
/// report is in the batch (reports are not carried) and for the triggers' rows, which carry none.
#[tokio::test]
async fn bulk_session_changes_carry_the_facts_they_commit() {
    use flotilla::status::DeviceReport;
    use flotilla::store::{DeviceFact, FeedLane};
    let (_db, store, other) = two_postgres_replicas().await;
    let ids = ["started", "acked", "reported", "rejected"];
    insert_devices_named(&store, &ids).await;
    let before = other.latest_change_id().await.unwrap();
    store
        .record_device_facts(vec![
            DeviceFact::Session {
                id: "started".into(),
                agent_version: "1.2".into(),
                running_version: Some("v0".into()),
                seen_ms: 5,
            },
            DeviceFact::Sync {
                id: "acked".into(),
                acked_version: Some("v1".into()),
                nacked: None,
            },
            DeviceFact::Sync {
                id: "rejected".into(),
                acked_version: None,
                nacked: Some(("v2".into(), "no room".into())),
            },
            DeviceFact::Report {
                id: "reported".into(),
                report: Arc::new(DeviceReport {
                    reported_ms: 6,
                    ..Default::default()
                }),
            },
        ])
        .await
        .unwrap();
    let changes = other
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    let reread = other
        .session_facts(ids.iter().map(|id| id.to_string()).collect())
        .await
        .unwrap();
    for expected in reread {
        let change = changes
            .iter()
            .find(|c| c.subject == expected.id)
            .unwrap_or_else(|| panic!("no change for {}", expected.id));
        if expected.id == "reported" {
            assert_eq!(change.facts, None, "a report is re-read");
            continue;
        }
        let carried = change.facts.clone().expect("facts carried");
        assert_eq!(
            *carried,
            flotilla::store::SessionFacts {
                report: None,
                ..expected.clone()
            },
            "{}",
            expected.id
        );
    }
    let started = changes.iter().find(|c| c.subject == "started").unwrap();
    let started = started.facts.as_ref().unwrap();
    assert_eq!(started.session_replica.as_deref(), Some(store.replica()));
    assert_eq!(started.agent_version.as_deref(), Some("1.2"));
    let rejected = changes.iter().find(|c| c.subject == "rejected").unwrap();
    assert_eq!(
        rejected.facts.as_ref().unwrap().nacked,
        Some(("v2".to_string(), "no room".to_string()))
    );
    // This replica's own changes are applied already: nothing to read from them.
    let own = store
        .changes_after(before, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    assert!(own.iter().all(|c| c.own && c.facts.is_none()));
    // A change the triggers write (two answers of one device in a batch, written one by one)
    // carries nothing: the device is re-read.
    let answer = |version: &str| DeviceFact::Sync {
        id: "started".into(),
        acked_version: Some(version.into()),
        nacked: None,
    };
    store
        .record_device_facts(vec![answer("v5"), answer("v6")])
        .await
        .unwrap();
    let last = changes.last().unwrap().id;
    let after = other
        .changes_after(last, 100, Some(FeedLane::Sessions))
        .await
        .unwrap();
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|c| c.facts.is_none()));
}

/// On PostgreSQL every acknowledgement and session start rewrites its device's row; the devices
/// table keeps room on its pages, so the new row version stays on the page of the old one and no
/// index gets an entry for it (a HOT update), batch after batch.
///
/// The room holds the live version and the next one; the versions before can only be pruned once
/// no transaction anywhere on the server is older than the batch that made them dead (a snapshot
/// taken in any database holds them back). Other tests write to the same server in parallel, so
/// each batch waits for those older transactions to end, as it would find them ended in a fleet.
#[tokio::test]
async fn acknowledgements_leave_device_rows_on_their_pages() {
    use diesel::prelude::*;
    use flotilla::store::DeviceFact;
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Placed {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        page: i32,
    }
    let (db, store) = postgres_store_as("a").await;
    // Enough rows to fill pages: with no room kept, the first batch moves every row.
    let ids = insert_numbered_devices(&store, 3000).await;
    let url = db.url.clone();
    let placement = move || {
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        diesel::sql_query(
            "SELECT id, (ctid::text::point)[0]::integer AS page FROM devices ORDER BY id",
        )
        .load::<Placed>(&mut conn)
        .unwrap()
    };
    let before = tokio::task::spawn_blocking(placement.clone())
        .await
        .unwrap();
    assert_eq!(before.len(), ids.len());
    for round in 0..4 {
        let facts = ids
            .iter()
            .map(|id| match round {
                1 => DeviceFact::Session {
                    id: id.clone(),
                    agent_version: "1.1".into(),
                    running_version: Some("v1".into()),
                    seen_ms: 7,
                },
                _ => DeviceFact::Sync {
                    id: id.clone(),
                    acked_version: Some(format!("v{round}")),
                    nacked: None,
                },
            })
            .collect();
        let url = db.url.clone();
        tokio::task::spawn_blocking(move || wait_for_older_transactions(&url))
            .await
            .unwrap();
        store.record_device_facts(facts).await.unwrap();
        let after = tokio::task::spawn_blocking(placement.clone())
            .await
            .unwrap();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(moved, 0, "rows moved to another page in round {round}");
    }
}

/// Returns once every transaction and snapshot on the server (in any database) is younger than
/// everything committed before the call.
fn wait_for_older_transactions(url: &str) {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Xid {
        #[diesel(sql_type = diesel::sql_types::Text)]
        xid: String,
    }
    #[derive(QueryableByName)]
    struct Older {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        older: i64,
    }
    let mut conn = diesel::PgConnection::establish(url).unwrap();
    // An xid of its own, committed at once: every earlier commit has a smaller one.
    let now = diesel::sql_query("SELECT (txid_current() % 4294967296)::text AS xid")
        .get_result::<Xid>(&mut conn)
        .unwrap()
        .xid;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let older = diesel::sql_query(
            "SELECT count(*) AS older FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND greatest(age(backend_xid), age(backend_xmin)) > age($1::xid)",
        )
        .bind::<diesel::sql_types::Text, _>(&now)
        .get_result::<Older>(&mut conn)
        .unwrap()
        .older;
        if older == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{older} transactions older than xid {now} still run after two minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A batch of device facts leaves every column as writing them one by one would, whether a device
/// has one fact in the batch (written with the others of its kind, on PostgreSQL) or several.
#[tokio::test]
async fn a_batch_of_device_facts_ends_as_its_sequence_would() {
    use flotilla::store::DeviceFact;
    let tmp = tempfile::tempdir().unwrap();
    let (store, _db) = test_store(tmp.path()).await;
    let ids = ["a", "b", "c", "d", "e"];
    let devices = ids
        .iter()
        .map(|id| (device(id, &format!("dev-{id}")), certificate(id)))
        .collect();
    store
        .insert_devices(devices, seal(), "t".into())
        .await
        .unwrap();
    let session = |id: &str, running: Option<&str>, seen_ms: i64| DeviceFact::Session {
        id: id.into(),
        agent_version: format!("agent-{seen_ms}"),
        running_version: running.map(str::to_string),
        seen_ms,
    };
    let sync = |id: &str, acked: Option<&str>, nacked: Option<(&str, &str)>| DeviceFact::Sync {
        id: id.into(),
        acked_version: acked.map(str::to_string),
        nacked: nacked.map(|(v, e)| (v.to_string(), e.to_string())),
    };
    store
        .record_device_facts(vec![sync("b", Some("v7"), None)])
        .await
        .unwrap();
    store
        .record_device_facts(vec![
            // a: one session start with the version it runs; b: one without.
            session("a", Some("v1"), 10),
            session("b", None, 11),
            // c: one answer, a rejection; d: an ACK after its session start.
            sync("c", Some("v0"), Some(("v2", "disk full"))),
            session("d", Some("v1"), 12),
            sync("d", Some("v3"), None),
            // e: session start, end, and a later start.
            session("e", Some("v5"), 13),
            DeviceFact::LastSeen {
                id: "e".into(),
                seen_ms: 14,
            },
            session("e", None, 15),
        ])
        .await
        .unwrap();
    let found = store
        .get_devices(ids.iter().map(|id| id.to_string()).collect())
        .await
        .unwrap();
    let by_id: BTreeMap<&str, _> = found.iter().map(|d| (d.id.as_str(), d)).collect();
    let acked = |id: &str| by_id[id].acked_version.as_deref();
    assert_eq!(acked("a"), Some("v1"));
    assert_eq!(
        acked("b"),
        Some("v7"),
        "a start without a version keeps the last ACK"
    );
    assert_eq!(acked("c"), Some("v0"));
    assert_eq!(
        by_id["c"].nacked,
        Some(("v2".to_string(), "disk full".to_string()))
    );
    assert_eq!(acked("d"), Some("v3"), "the later answer wins");
    assert_eq!(acked("e"), Some("v5"), "a start without a version keeps it");
    assert_eq!(by_id["e"].agent_version.as_deref(), Some("agent-15"));
    assert_eq!(by_id["e"].last_seen_ms, Some(15));
    assert_eq!(by_id["b"].last_seen_ms, Some(11));
    if store.has_change_feed() {
        for id in ["a", "b", "d", "e"] {
            assert_eq!(
                by_id[id].session_replica.as_deref(),
                Some(store.replica()),
                "{id} holds its session here"
            );
        }
        assert_eq!(by_id["c"].session_replica, None);
    }
}

/// The certificate group commit: a batch of issuances and supersessions for distinct devices (the
/// bulk path) and the same batch with a device twice (written one by one) end alike — refusals,
/// superseded spares, certificate rows and one intact audit chain.
#[tokio::test]
async fn a_batch_of_certificate_writes_ends_as_one_by_one_would() {
    use flotilla::store::{CertificateWrite, CertificateWritten};
    async fn run(with_a_device_twice: bool) -> (Vec<String>, Vec<(String, bool)>, Vec<String>) {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _db) = test_store(tmp.path()).await;
        let (key, _) = AuditKey::generate().unwrap();
        let key = Arc::new(key);
        let seal: Arc<dyn AuditSeal> = key.clone();
        let cert = |id: &str, serial: &str| CertificateRecord {
            serial: serial.into(),
            key_fingerprint: format!("key-{serial}"),
            ..certificate(id)
        };
        let ids = ["a", "b", "c", "d"];
        store
            .insert_devices(
                ids.iter()
                    .map(|id| (device(id, &format!("dev-{id}")), certificate(id)))
                    .collect(),
                seal.clone(),
                "t".into(),
            )
            .await
            .unwrap();
        // c holds a spare (renewed, not yet used); b's current certificate is revoked.
        let spare = store
            .record_certificate_writes(
                vec![CertificateWrite::Issue {
                    certificate: cert("c", "c-2"),
                    entry: AuditEntry {
                        kind: "renewed".into(),
                        device_id: "c".into(),
                        serial: "c-2".into(),
                        outcome: "ok".into(),
                        ..Default::default()
                    },
                    rules: IssuanceRules {
                        renews: Some("serial-c".into()),
                    },
                }],
                seal.clone(),
            )
            .await
            .unwrap();
        assert!(spare[0].is_ok());
        store
            .revoke_certificates(
                Revocation {
                    serials: vec!["serial-b".into()],
                    reason: "lost".into(),
                    actor: "admin/admin".into(),
                    now_ms: 3,
                    ..Default::default()
                },
                Audited {
                    seal: seal.clone(),
                    entries: vec![],
                },
            )
            .await
            .unwrap();
        let renew = |id: &str, serial: &str, renews: &str| CertificateWrite::Issue {
            certificate: cert(id, serial),
            entry: AuditEntry {
                kind: "renewed".into(),
                device_id: id.into(),
                serial: serial.into(),
                actor: format!("device/{id}"),
                outcome: "ok".into(),
                ..Default::default()
            },
            rules: IssuanceRules {
                renews: Some(renews.into()),
            },
        };
        let mut writes = vec![
            renew("a", "a-2", "serial-a"),
            renew("b", "b-2", "serial-b"),
            // c now uses c-2: its old certificate goes.
            CertificateWrite::Supersede {
                device_id: "c".into(),
                keep: "c-2".into(),
                actor: "device/c".into(),
                now_ms: 5,
            },
        ];
        if with_a_device_twice {
            writes.push(renew("a", "a-3", "serial-a"));
        } else {
            writes.push(renew("d", "d-2", "serial-d"));
        }
        let outcomes = store
            .record_certificate_writes(writes, seal.clone())
            .await
            .unwrap();
        let described: Vec<String> = outcomes
            .iter()
            .map(|o| match o {
                Ok(CertificateWritten::Issued(r)) => format!(
                    "issued {} superseding {:?}",
                    r.record.entry.serial,
                    r.superseded
                        .iter()
                        .map(|c| c.serial.clone())
                        .collect::<Vec<_>>()
                ),
                Ok(CertificateWritten::Superseded(s)) => format!(
                    "superseded {:?}",
                    s.iter()
                        .map(|c| (c.serial.clone(), c.revoked_ms))
                        .collect::<Vec<_>>()
                ),
                Err(e) => format!("refused: {e}"),
            })
            .collect();
        let certificates: Vec<(String, bool)> = store
            .list_certificates(None)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.serial, c.revoked_ms.is_some()))
            .collect();
        let all = store
            .list_audit(AuditQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(verify_chain(&all, &key.public_key_der()), Ok(all.len()));
        let kinds: Vec<String> = all
            .iter()
            .map(|r| format!("{} {}", r.entry.kind, r.entry.serial))
            .collect();
        let current: Vec<Option<String>> = store
            .get_devices(ids.iter().map(|s| s.to_string()).collect())
            .await
            .unwrap()
            .into_iter()
            .filter(|d| d.id == "a" || d.id == "c")
            .map(|d| d.cert_serial)
            .collect();
        assert!(current.contains(&Some("c-2".to_string())));
        (described, certificates, kinds)
    }
    let (bulk, bulk_certificates, bulk_audit) = run(false).await;
    assert_eq!(bulk[0], "issued a-2 superseding []");
    assert!(
        bulk[1].starts_with("refused: ") && bulk[1].contains("serial-b"),
        "{}",
        bulk[1]
    );
    assert_eq!(bulk[2], "superseded [(\"serial-c\", Some(5))]");
    assert_eq!(bulk[3], "issued d-2 superseding []");
    let (single, single_certificates, single_audit) = run(true).await;
    assert_eq!(bulk[..3], single[..3], "the same writes, the same outcomes");
    // a-3 renews serial-a too, so it supersedes a-2 (the spare a-2 made of nothing else).
    assert_eq!(single[3], "issued a-3 superseding [\"a-2\"]");
    for (serial, revoked) in [
        ("serial-c", true),
        ("c-2", false),
        ("serial-a", false),
        ("a-2", false),
    ] {
        assert!(
            bulk_certificates.contains(&(serial.to_string(), revoked)),
            "{serial}: {bulk_certificates:?}"
        );
    }
    assert!(
        !bulk_certificates.iter().any(|(s, _)| s == "b-2"),
        "nothing issued for a revoked renewal"
    );
    assert!(!single_certificates.iter().any(|(s, _)| s == "b-2"));
    for audit in [&bulk_audit, &single_audit] {
        assert!(
            audit.contains(&"superseded serial-c".to_string()),
            "{audit:?}"
        );
        assert!(audit.contains(&"renewed a-2".to_string()));
        assert!(!audit.iter().any(|r| r.ends_with(" b-2")));
    }
}

/// A burst of operations far beyond the pool (here 2 connections, each answer delayed 100 ms by a
/// proxy) queues for its turn: every operation succeeds and the database is not taken for
/// unreachable, though the burst outlasts the pool's 5-second checkout timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_pool_waits_its_turn_and_is_no_outage() {
    let db = support::TestDb::postgres_for_tests();
    let proxy = support::proxy::Proxy::start(db.server_addr()).await;
    let url = db.url_via(proxy.addr);
    let store = tokio::task::spawn_blocking(move || {
        Store::open_pooled(Backend::from_url(&url), "burst", 2)
    })
    .await
    .unwrap()
    .unwrap();
    store.migrate().await.unwrap();
    proxy.set_latency(std::time::Duration::from_millis(100));
    let started = std::time::Instant::now();
    let operations: Vec<_> = (0..60)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get_devices(vec!["none".into()]).await })
        })
        .collect();
    for operation in operations {
        operation.await.unwrap().expect("queued, not refused");
    }
    assert!(
        started.elapsed() > std::time::Duration::from_secs(5),
        "the burst outlasted the checkout timeout ({:?})",
        started.elapsed()
    );
    assert!(store.reachability().is_reachable());
}
