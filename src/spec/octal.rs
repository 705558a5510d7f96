//! Serde for file modes as octal text ("0644"), the way operators write them.

use serde::{Deserialize, Deserializer, Serializer, de};

pub(super) fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Text(String),
    Number(u32),
}

/// Accepts "0644" / "644" / "0o644" as octal text; a bare number is taken as octal digits too
/// (YAML `mode: 644`), because that is what every operator means by it.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = match Raw::deserialize(d)? {
        Raw::Text(t) => t,
        Raw::Number(n) => n.to_string(),
    };
    let digits = text.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .map_err(|_| de::Error::custom(format!("mode {text:?} is not an octal number")))
}

#[cfg(test)]
mod tests {
    use crate::spec::{DEFAULT_FILE_MODE, FileSpec};

    #[test]
    fn mode_parses_as_octal_in_yaml_and_json() {
        let f: FileSpec = serde_json::from_str(r#"{"path":"/a","mode":"0600"}"#).unwrap();
        assert_eq!(f.mode, 0o600);
        let f: FileSpec = serde_json::from_str(r#"{"path":"/a","mode":755}"#).unwrap();
        assert_eq!(f.mode, 0o755);
        let f: FileSpec = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(f.mode, DEFAULT_FILE_MODE);
        assert!(serde_json::from_str::<FileSpec>(r#"{"path":"/a","mode":"9"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"path":"/a","content":"","mode":"0644"}"#
        );
    }
}
