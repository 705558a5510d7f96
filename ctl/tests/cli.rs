//! flotctl as a built binary, for what needs no control plane: shell completion, release keys and
//! signatures made locally, and the error a missing configuration gives. (Building this test also
//! builds `target/*/flotctl`, which the root package's end-to-end tests run.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn flotctl(args: &[&str], home: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotctl"))
        .args(args)
        .env("HOME", home)
        .env_remove("FLOTCTL_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("run flotctl")
}

#[test]
fn completion_scripts_for_each_shell() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let output = flotctl(&["completion", shell], home.path());
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains("rollout"), "{shell}: {script}");
    }
    let refused = flotctl(&["completion", "cmd.exe"], home.path());
    assert_eq!(refused.status.code(), Some(2));
}

#[test]
fn a_release_is_signed_locally_and_a_second_keygen_keeps_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("release");
    let key_arg = key.to_str().unwrap();
    assert!(
        flotctl(&["agent-release", "keygen", "--out", key_arg], dir.path())
            .status
            .success()
    );
    let public = std::fs::read_to_string(dir.path().join("release.pub")).unwrap();
    let again = flotctl(&["agent-release", "keygen", "--out", key_arg], dir.path());
    assert!(!again.status.success(), "keygen overwrote a key");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("release.pub")).unwrap(),
        public
    );

    let build = dir.path().join("flotilla-agent");
    std::fs::write(&build, b"\x7fELF a build").unwrap();
    let signed = flotctl(
        &[
            "agent-release",
            "sign",
            "--key",
            dir.path().join("release.key").to_str().unwrap(),
            "--version",
            "1.2.3",
            build.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let signature = std::fs::read_to_string(dir.path().join("flotilla-agent.sig")).unwrap();
    assert!(signature.contains("1.2.3"), "{signature}");
}

#[test]
fn without_a_configuration_flotctl_says_where_one_comes_from() {
    let home = tempfile::tempdir().unwrap();
    let output = flotctl(&["get", "devices"], home.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("flotctl.toml"), "{stderr}");
}
