//! What one certificate renewal costs the control plane's CPU: validating the device's CSR
//! (parse, proof of possession, key type) and signing its certificate. Run with
//! `cargo bench --bench csr_sign`; the figure per core is in BENCHMARKS.md.
// A benchmark stops at the first failure of its setup, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flotilla::ca::csr::verify_csr_pem;
use flotilla::ca::{CertificateAuthority, Subject, Usage};
use flotilla::identity::{Identity, Role};
use std::hint::black_box;
use std::time::Duration;

fn device_csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "flotilla://device/0f6f2f44-0000-4000-8000-000000000001"
            .try_into()
            .expect("uri"),
    )];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn subject() -> Subject {
    Subject {
        common_name: "bench-device".into(),
        identity: Some(Identity::new(
            Role::Device,
            "0f6f2f44-0000-4000-8000-000000000001",
        )),
        dns_names: vec![],
        ip_addresses: vec![],
        usage: Usage::Client,
        validity: Duration::from_secs(365 * 24 * 3600),
    }
}

fn renewal(c: &mut Criterion) {
    let (ca, _) = CertificateAuthority::generate("bench CA", Duration::from_secs(3600 * 24 * 365))
        .expect("CA");
    let csr = device_csr();
    let subject = subject();
    let mut group = c.benchmark_group("renewal");
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify_csr", |b| {
        b.iter(|| verify_csr_pem(black_box(&csr)).expect("valid CSR"))
    });
    let key = verify_csr_pem(&csr).expect("valid CSR");
    group.bench_function("sign", |b| {
        b.iter(|| ca.sign(black_box(&subject), &key).expect("signed"))
    });
    group.bench_function("verify_csr_and_sign", |b| {
        b.iter(|| {
            let key = verify_csr_pem(black_box(&csr)).expect("valid CSR");
            ca.sign(&subject, &key).expect("signed")
        })
    });
    group.finish();
}

criterion_group!(benches, renewal);
criterion_main!(benches);
