//! Rules for device names and labels, checked wherever one enters the system.

use std::collections::BTreeMap;

/// Longest device name, so a name always fits a DNS label and a certificate CN.
pub const MAX_NAME_LEN: usize = 63;
const MAX_LABEL_KEY_LEN: usize = 63;
const MAX_LABEL_VALUE_LEN: usize = 63;
/// Most labels one device, request or fleet default set may carry: enough for any real
/// classification, and it keeps every listing small.
pub const MAX_LABELS: usize = 64;

/// Why a device name or label is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// An empty name.
    #[error("name must not be empty")]
    Empty,
    /// A name longer than `max` characters.
    #[error("name {name:?} is longer than {max} characters")]
    TooLong {
        /// The name refused.
        name: String,
        /// The longest allowed.
        max: usize,
    },
    /// A name with characters outside the allowed set.
    #[error(
        "name {0:?} may contain only lowercase letters, digits, '-' and '.', and must start and end with a letter or digit"
    )]
    Invalid(String),
    /// A label key that is not a valid key.
    #[error(
        "label key {0:?} is invalid: use letters, digits, '-', '_', '.' and an optional 'prefix/', at most 63 characters"
    )]
    LabelKey(String),
    /// A label value that is not a valid value.
    #[error(
        "label value {value:?} of {key:?} is invalid: use letters, digits, '-', '_', '.', at most 63 characters"
    )]
    LabelValue {
        /// The label's key.
        key: String,
        /// The value refused.
        value: String,
    },
    /// More labels than a device may carry.
    #[error("{count} labels is more than the {max} allowed")]
    TooManyLabels {
        /// How many were given.
        count: usize,
        /// How many are allowed.
        max: usize,
    },
}

/// Checks a device or resource name: lowercase alphanumerics, '-' and '.', alphanumeric at both ends.
/// Reads a `key=value` command-line argument (`--label site=berlin`); the key and value are
/// validated where they are used.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} must be key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

/// Checks a device or fleet name.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.to_string(),
            max: MAX_NAME_LEN,
        });
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !name.chars().all(ok_char) || !ok_end(name.chars().next()) || !ok_end(name.chars().last()) {
        return Err(NameError::Invalid(name.to_string()));
    }
    Ok(())
}

fn label_token_ok(s: &str, max: usize, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= max
        && s.chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
        && s.chars().next().is_some_and(alnum)
        && s.chars().last().is_some_and(alnum)
}

/// Checks a label key: `name` or `prefix/name`, Kubernetes style.
pub fn validate_label_key(key: &str) -> Result<(), NameError> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if validate_name(prefix).is_err() {
                return Err(NameError::LabelKey(key.to_string()));
            }
            name
        }
        None => key,
    };
    if label_token_ok(name, MAX_LABEL_KEY_LEN, false) {
        Ok(())
    } else {
        Err(NameError::LabelKey(key.to_string()))
    }
}

/// Checks every key and value of a label set. Empty values are allowed.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), NameError> {
    if labels.len() > MAX_LABELS {
        return Err(NameError::TooManyLabels {
            count: labels.len(),
            max: MAX_LABELS,
        });
    }
    for (key, value) in labels {
        validate_label_key(key)?;
        validate_label_value(key, value)?;
    }
    Ok(())
}

/// Checks one label value (empty is allowed); `key` only names it in the error.
pub fn validate_label_value(key: &str, value: &str) -> Result<(), NameError> {
    if label_token_ok(value, MAX_LABEL_VALUE_LEN, true) {
        Ok(())
    } else {
        Err(NameError::LabelValue {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "dev-1", "berlin.gw-01", "0x"] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", "a-", "Dev", "a_b", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        let ok: BTreeMap<_, _> = [("site", "berlin"), ("example.com/tier", ""), ("A_b", "X.1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(validate_labels(&ok), Ok(()));
        for (k, v) in [
            ("", "x"),
            ("a", "-x"),
            ("/a", "x"),
            ("a b", "x"),
            ("a", "x y"),
        ] {
            let m = BTreeMap::from([(k.to_string(), v.to_string())]);
            assert!(validate_labels(&m).is_err(), "{k}={v}");
        }
    }
}
