//! The agent links no database code: the root package's server-only parts stay behind its
//! `server` feature.

use std::process::Command;

#[test]
fn the_agent_dependency_tree_has_no_database_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "flotilla-agent",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8(output.stdout).unwrap();
    assert!(
        tree.lines().any(|l| l.starts_with("flotilla ")),
        "the tree lists the root package:\n{tree}"
    );
    for forbidden in ["diesel", "libsqlite3-sys", "pq-sys", "r2d2"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "flotilla-agent depends on {forbidden}"
        );
    }
}
