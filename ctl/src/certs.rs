//! `flotctl cert …`: list certificates with days to expiry, revoke, and force a renewal.

use crate::output::{Format, print};
use crate::rpc;
use anyhow::{Result, bail};
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::certificate_service_client::CertificateServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Serialize)]
struct CertificateView {
    serial: String,
    device: String,
    device_id: String,
    current: bool,
    not_before: Option<String>,
    not_after: Option<String>,
    /// Whole days left before expiry (negative once expired).
    days_left: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    revocation_reason: String,
    key_fingerprint: String,
    certificate_pem: String,
}

fn days_left(not_after: Option<&prost_types::Timestamp>) -> i64 {
    let now = flotilla::clock::now_secs();
    not_after
        .map(|t| (t.seconds - now).div_euclid(86_400))
        .unwrap_or(0)
}

pub(crate) async fn list(channel: Channel, format: Format, device: Option<String>) -> Result<()> {
    let certificates = CertificateServiceClient::new(channel)
        .list_certificates(pb::ListCertificatesRequest {
            device: device.unwrap_or_default(),
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .certificates;
    let views: Vec<CertificateView> = certificates
        .into_iter()
        .map(|c| CertificateView {
            days_left: days_left(c.not_after.as_ref()),
            serial: c.serial,
            device: c.device_name,
            device_id: c.device_id,
            current: c.current,
            not_before: c.not_before.map(|t| t.to_string()),
            not_after: c.not_after.map(|t| t.to_string()),
            revoked_at: c.revoked_at.map(|t| t.to_string()),
            revocation_reason: c.revocation_reason,
            key_fingerprint: c.key_fingerprint,
            certificate_pem: c.certificate_pem,
        })
        .collect();
    print(
        format,
        &views,
        false,
        &[
            "SERIAL",
            "DEVICE",
            "CURRENT",
            "NOT AFTER",
            "DAYS LEFT",
            "REVOKED",
        ],
        |c| {
            vec![
                c.serial.clone(),
                c.device.clone(),
                c.current.to_string(),
                c.not_after.clone().unwrap_or_default(),
                c.days_left.to_string(),
                c.revoked_at.clone().unwrap_or_default(),
            ]
        },
    )
}

pub(crate) async fn revoke(
    channel: Channel,
    serial: Option<String>,
    device: Option<String>,
    reason: String,
) -> Result<()> {
    if serial.is_some() == device.is_some() {
        bail!("give either a SERIAL or --device NAME");
    }
    let revoked = CertificateServiceClient::new(channel)
        .revoke_certificate(pb::RevokeCertificateRequest {
            serial: serial.unwrap_or_default(),
            device: device.unwrap_or_default(),
            reason,
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .revoked_serials;
    if revoked.is_empty() {
        println!("nothing to revoke (already revoked)");
    }
    for serial in revoked {
        println!("certificate/{serial} revoked");
    }
    Ok(())
}

pub(crate) async fn renew(
    channel: Channel,
    device: Option<String>,
    selector: Option<String>,
) -> Result<()> {
    let response = CertificateServiceClient::new(channel)
        .renew_certificate(pb::RenewCertificateRequest {
            device: device.clone().unwrap_or_default(),
            selector: selector.unwrap_or_default(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    match device {
        Some(device) => println!("device/{device} asked to renew its certificate"),
        None => println!(
            "{} connected device(s) asked to renew; {} not connected (they renew when due)",
            response.asked, response.not_connected
        ),
    }
    Ok(())
}
