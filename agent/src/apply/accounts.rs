//! Resolving file owners and groups: a numeric id, or a name looked up in /etc/passwd and
//! /etc/group (the agent links no NSS library).

use std::path::Path;

fn lookup(database: &Path, name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(database)
        .map_err(|e| format!("reading {}: {e}", database.display()))?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let entry = fields.next()?;
            let id = fields.nth(1)?;
            (entry == name).then(|| id.parse::<u32>().ok()).flatten()
        })
        .next()
        .ok_or_else(|| format!("no such entry {name:?} in {}", database.display()))
}

pub(super) fn user_id(name: &str) -> Result<u32, String> {
    lookup(Path::new("/etc/passwd"), name)
}

pub(super) fn group_id(name: &str) -> Result<u32, String> {
    lookup(Path::new("/etc/group"), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001::/srv:/bin/false\n",
        )
        .unwrap();
        assert_eq!(lookup(&passwd, "app"), Ok(1001));
        assert_eq!(lookup(&passwd, "0"), Ok(0));
        assert_eq!(lookup(&passwd, "42"), Ok(42));
        assert!(
            lookup(&passwd, "ghost")
                .unwrap_err()
                .contains("no such entry")
        );
        assert_eq!(user_id("root"), Ok(0));
    }
}
