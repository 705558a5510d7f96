//! The agent's health: checks of enrollment, certificate validity, the management stream, the last
//! apply, the state directory (writable, records readable) and its disk space — each pass, warn or
//! fail — served with the agent's metrics on a local HTTP endpoint (`/healthz`: 200 unless a check fails, then 503; JSON body;
//! `/metrics`: Prometheus exposition).

use flotilla::httpd::{self, Reply};
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A stream down this long fails the stream check (shorter outages only warn).
const STREAM_FAIL_AFTER: Duration = Duration::from_secs(300);
/// Free space below these fractions of the state directory's filesystem warns / fails.
const DISK_WARN_FRACTION: f64 = 0.10;
const DISK_FAIL_FRACTION: f64 = 0.02;
/// ... or below these absolute amounts.
const DISK_WARN_BYTES: u64 = 100 * 1024 * 1024;
const DISK_FAIL_BYTES: u64 = 10 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Level,
    pub message: String,
}

/// Where enrollment stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrollment {
    NotStarted,
    Waiting,
    Enrolled,
    Refused(String),
}

/// What the checks look at, kept up to date by the agent's tasks.
#[derive(Debug)]
pub(crate) struct Inputs {
    pub enrollment: Enrollment,
    /// Validity of the current certificate, Unix seconds.
    pub certificate: Option<(i64, i64)>,
    pub renew_before: Duration,
    pub connected: bool,
    /// Since when the stream has been in its current state.
    pub since: Instant,
    /// The last apply's error, if it failed.
    pub last_apply: Option<Result<String, String>>,
    /// (available, total) bytes of the state directory's filesystem.
    pub disk: Option<(u64, u64)>,
    /// A problem with the state directory (cannot be written, held a corrupt record).
    pub state: Option<(Level, String)>,
}

fn check(name: &'static str, status: Level, message: impl Into<String>) -> Check {
    Check {
        name,
        status,
        message: message.into(),
    }
}

/// Evaluates every check. Pure: `now` is Unix seconds.
pub(crate) fn evaluate(inputs: &Inputs, now: i64, elapsed: Duration) -> Vec<Check> {
    let enrollment = match &inputs.enrollment {
        Enrollment::Enrolled => check("enrollment", Level::Pass, "enrolled"),
        Enrollment::Waiting => check("enrollment", Level::Warn, "waiting for approval"),
        Enrollment::NotStarted => check("enrollment", Level::Fail, "not enrolled"),
        Enrollment::Refused(reason) => check("enrollment", Level::Fail, reason.clone()),
    };
    let certificate = match inputs.certificate {
        None => check("certificate", Level::Fail, "no certificate"),
        Some((_, not_after)) if not_after <= now => check(
            "certificate",
            Level::Fail,
            format!("expired {} s ago", now - not_after),
        ),
        Some((_, not_after)) if now + inputs.renew_before.as_secs() as i64 >= not_after => check(
            "certificate",
            Level::Warn,
            format!("expires in {} s; renewal due", not_after - now),
        ),
        Some((_, not_after)) => check(
            "certificate",
            Level::Pass,
            format!("valid for {} s", not_after - now),
        ),
    };
    let stream = if inputs.connected {
        check("stream", Level::Pass, "connected")
    } else if elapsed < STREAM_FAIL_AFTER {
        check(
            "stream",
            Level::Warn,
            format!("disconnected for {} s", elapsed.as_secs()),
        )
    } else {
        check(
            "stream",
            Level::Fail,
            format!("disconnected for {} s", elapsed.as_secs()),
        )
    };
    let apply = match &inputs.last_apply {
        None => check("last_apply", Level::Pass, "nothing applied yet"),
        Some(Ok(version)) => check("last_apply", Level::Pass, format!("applied {version}")),
        Some(Err(error)) => check("last_apply", Level::Fail, error.clone()),
    };
    let disk = match inputs.disk {
        None => check("disk", Level::Warn, "free space unknown"),
        Some((available, total)) => {
            let fraction = if total == 0 {
                0.0
            } else {
                available as f64 / total as f64
            };
            let message = format!(
                "{} MiB free ({:.1}%)",
                available / (1024 * 1024),
                fraction * 100.0
            );
            let level = if fraction < DISK_FAIL_FRACTION || available < DISK_FAIL_BYTES {
                Level::Fail
            } else if fraction < DISK_WARN_FRACTION || available < DISK_WARN_BYTES {
                Level::Warn
            } else {
                Level::Pass
            };
            check("disk", level, message)
        }
    };
    let state = match &inputs.state {
        None => check("state", Level::Pass, "state directory in order"),
        Some((level, message)) => check("state", *level, message.clone()),
    };
    vec![enrollment, certificate, stream, apply, disk, state]
}

/// Free and total bytes of the filesystem holding `path`.
pub(crate) fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a writable statvfs.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    let block = stat.f_frsize as u64;
    Some((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}

/// The agent's live health, shared by its tasks.
#[derive(Debug)]
pub struct Health {
    inputs: Mutex<Inputs>,
    state_dir: PathBuf,
}

fn unix_now() -> i64 {
    flotilla::clock::now_secs()
}

impl Health {
    pub fn new(state_dir: PathBuf) -> Health {
        Health {
            inputs: Mutex::new(Inputs {
                enrollment: Enrollment::NotStarted,
                certificate: None,
                renew_before: crate::renewal::DEFAULT_RENEW_BEFORE,
                connected: false,
                since: Instant::now(),
                last_apply: None,
                disk: None,
                state: None,
            }),
            state_dir,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Inputs)) {
        change(&mut self.inputs.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn set_enrollment(&self, enrollment: Enrollment) {
        self.update(|i| i.enrollment = enrollment);
    }

    pub fn set_certificate(&self, not_before: i64, not_after: i64, renew_before: Duration) {
        gauge!("flotilla_agent_certificate_expiry_seconds").set(not_after as f64);
        self.update(|i| {
            i.certificate = Some((not_before, not_after));
            i.renew_before = renew_before;
        });
    }

    pub fn set_connected(&self, connected: bool) {
        gauge!("flotilla_agent_connected").set(if connected { 1.0 } else { 0.0 });
        self.update(|i| {
            if i.connected != connected {
                i.connected = connected;
                i.since = Instant::now();
            }
        });
    }

    pub fn set_last_apply(&self, result: Result<String, String>) {
        self.update(|i| i.last_apply = Some(result));
    }

    /// Reports a problem with the state directory (`None`: it is in order again).
    pub fn set_state(&self, problem: Option<(Level, String)>) {
        self.update(|i| i.state = problem);
    }

    /// Evaluates every check now.
    pub fn report(&self) -> Vec<Check> {
        let disk = disk_space(&self.state_dir);
        let inputs = &mut self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        inputs.disk = disk;
        let checks = evaluate(inputs, unix_now(), inputs.since.elapsed());
        for c in &checks {
            let value = match c.status {
                Level::Pass => 0.0,
                Level::Warn => 1.0,
                Level::Fail => 2.0,
            };
            gauge!("flotilla_agent_health", "check" => c.name).set(value);
        }
        checks
    }
}

#[derive(Serialize)]
struct Body<'a> {
    status: Level,
    checks: &'a [Check],
}

/// The `/healthz` answer: 200 unless a check fails, then 503; the checks as JSON.
pub(crate) fn health_response(checks: &[Check]) -> (u16, String) {
    let failed = checks.iter().any(|c| c.status == Level::Fail);
    let status = if failed {
        Level::Fail
    } else if checks.iter().any(|c| c.status == Level::Warn) {
        Level::Warn
    } else {
        Level::Pass
    };
    let body = serde_json::to_string(&Body { status, checks }).unwrap_or_default();
    let code = if failed { 503 } else { 200 };
    (code, body)
}

/// Serves `/healthz` and `/metrics` until the process ends.
pub(crate) async fn serve(
    listener: TcpListener,
    health: std::sync::Arc<Health>,
    metrics: PrometheusHandle,
) {
    let route = move |path: &str| match path {
        "/healthz" => {
            let (code, body) = health_response(&health.report());
            Reply {
                status: code,
                content_type: "application/json",
                body,
            }
        }
        "/metrics" => {
            health.report();
            Reply::metrics(metrics.render())
        }
        _ => Reply::not_found(),
    };
    httpd::serve(listener, "health", route, std::future::pending()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;
    use hyper::StatusCode;
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    const NOW: i64 = 1_000_000;
    const DAY: i64 = 86_400;

    fn healthy() -> Inputs {
        Inputs {
            enrollment: Enrollment::Enrolled,
            certificate: Some((NOW - DAY, NOW + 300 * DAY)),
            renew_before: Duration::from_secs(30 * DAY as u64),
            connected: true,
            since: Instant::now(),
            last_apply: Some(Ok("abc".into())),
            disk: Some((50 << 30, 100 << 30)),
            state: None,
        }
    }

    fn level(inputs: &Inputs, name: &str, elapsed: Duration) -> Level {
        evaluate(inputs, NOW, elapsed)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap()
            .status
    }

    fn answer(inputs: &Inputs, elapsed: Duration) -> u16 {
        health_response(&evaluate(inputs, NOW, elapsed)).0
    }

    #[test]
    fn a_healthy_agent_passes_every_check_with_200() {
        let inputs = healthy();
        let checks = evaluate(&inputs, NOW, Duration::ZERO);
        assert!(checks.iter().all(|c| c.status == Level::Pass), "{checks:?}");
        let (code, body) = health_response(&checks);
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["status"], "pass");
        assert_eq!(json["checks"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn each_check_warns_with_200_and_fails_with_503() {
        let zero = Duration::ZERO;
        type Change = fn(&mut Inputs);
        let cases: Vec<(&str, Change, Change, Duration)> = vec![
            (
                "enrollment",
                |i| i.enrollment = Enrollment::Waiting,
                |i| i.enrollment = Enrollment::Refused("denied".into()),
                zero,
            ),
            (
                "certificate",
                |i| i.certificate = Some((NOW - DAY, NOW + 10 * DAY)),
                |i| i.certificate = Some((NOW - 2 * DAY, NOW - DAY)),
                zero,
            ),
            (
                "disk",
                |i| i.disk = Some((5 << 30, 100 << 30)),
                |i| i.disk = Some((1 << 20, 100 << 30)),
                zero,
            ),
        ];
        for (name, warn, fail, elapsed) in cases {
            let mut warned = healthy();
            warn(&mut warned);
            assert_eq!(level(&warned, name, elapsed), Level::Warn, "{name}");
            assert_eq!(answer(&warned, elapsed), 200, "{name}");
            let mut failed = healthy();
            fail(&mut failed);
            assert_eq!(level(&failed, name, elapsed), Level::Fail, "{name}");
            assert_eq!(answer(&failed, elapsed), 503, "{name}");
        }

        let mut down = healthy();
        down.connected = false;
        assert_eq!(level(&down, "stream", Duration::from_secs(10)), Level::Warn);
        assert_eq!(answer(&down, Duration::from_secs(10)), 200);
        assert_eq!(
            level(&down, "stream", Duration::from_secs(600)),
            Level::Fail
        );
        assert_eq!(answer(&down, Duration::from_secs(600)), 503);

        let mut nacked = healthy();
        nacked.last_apply = Some(Err("file /etc/x: permission denied".into()));
        assert_eq!(level(&nacked, "last_apply", zero), Level::Fail);
        assert_eq!(answer(&nacked, zero), 503);
        let mut fresh = healthy();
        fresh.last_apply = None;
        assert_eq!(level(&fresh, "last_apply", zero), Level::Pass);
    }

    #[test]
    fn disk_space_reads_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (available, total) = disk_space(dir.path()).unwrap();
        assert!(total > 0 && available <= total);
        assert!(disk_space(std::path::Path::new("/nonexistent/path")).is_none());
    }

    #[tokio::test]
    async fn the_endpoint_answers_200_then_503_with_json() {
        let dir = tempfile::tempdir().unwrap();
        let health = std::sync::Arc::new(Health::new(dir.path().to_path_buf()));
        health.set_enrollment(Enrollment::Enrolled);
        health.set_certificate(
            0,
            unix_now() + 400 * DAY,
            Duration::from_secs(30 * DAY as u64),
        );
        health.set_connected(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        tokio::spawn(serve(listener, health.clone(), metrics));
        let get = |path: &'static str| async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let request = Request::get(path)
                .header("host", "localhost")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let code = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            (code, String::from_utf8(body.to_vec()).unwrap())
        };
        let (code, body) = get("/healthz").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert!(body.contains("\"name\":\"stream\""), "{body}");
        health.set_last_apply(Err("disk full".into()));
        let (code, body) = get("/healthz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("disk full"), "{body}");
        assert_eq!(get("/nope").await.0, StatusCode::NOT_FOUND);
    }
}
