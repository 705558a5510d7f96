//! A software TPM 2.0 (swtpm, manufactured and started by `scripts/swtpm.sh`) for the TPM tests of
//! the agent and of the end-to-end suite: each test gets its own, with EK certificates from a
//! local manufacturer CA of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm, killed when dropped.
pub(crate) struct Swtpm {
    child: Child,
    dir: tempfile::TempDir,
    /// The TCTI string an agent opens it with.
    pub tcti: String,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two free consecutive ports (swtpm's server and control ports), taken below the kernel's ephemeral
/// range so that no port another test was handed by the kernel, and has yet to bind, collides.
fn free_port_pair() -> u16 {
    loop {
        let port: u16 = rand::random_range(20000..30000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 1) {
            return port;
        }
    }
}

impl Swtpm {
    pub(crate) fn start() -> Swtpm {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port_pair();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|dir| dir.join("scripts/swtpm.sh"))
            .find(|script| script.exists())
            .expect("scripts/swtpm.sh");
        let child = Command::new("bash")
            .arg(script)
            .arg(dir.path())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start scripts/swtpm.sh (needs swtpm and swtpm-tools)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Swtpm {
            child,
            tcti: format!("swtpm:host=127.0.0.1,port={port}"),
            dir,
        }
    }

    pub(crate) fn ca_bundle(&self) -> PathBuf {
        self.dir.path().join("tpm-ca.pem")
    }

    /// The manufacturer CA certificates (DER) that signed this TPM's EK certificates.
    pub(crate) fn trusted(&self) -> Vec<Vec<u8>> {
        let pem = std::fs::read_to_string(self.ca_bundle()).unwrap();
        flotilla::pki::certs_from_pem(&pem)
            .unwrap()
            .into_iter()
            .map(|c| c.to_vec())
            .collect()
    }
}
