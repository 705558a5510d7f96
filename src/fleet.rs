//! Fleet membership: which fleet owns a device. A device belongs to at most one fleet; a device
//! matched by several is a conflict, reported on the device and on each fleet, and keeps the owner
//! it had. Pure: no I/O.

use crate::selector::Selector;
use std::collections::BTreeMap;

/// Where a device stands with respect to fleets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// The one fleet whose selector matches, if exactly one does.
    pub owner: Option<String>,
    /// Every fleet whose selector matches, when more than one does; empty otherwise.
    pub conflicts: Vec<String>,
}

/// Decides a device's owner from the fleets' selectors (in name order) and its current owner.
///
/// - no fleet matches: no owner;
/// - exactly one matches: that one;
/// - several match: the current owner stays (if it still exists), because picking one would be a
///   guess; the matching fleets are reported as the conflict.
pub fn place<'a>(
    fleets: impl IntoIterator<Item = (&'a str, &'a Selector)>,
    labels: &BTreeMap<String, String>,
    current: Option<&str>,
) -> Placement {
    let mut matching = Vec::new();
    let mut current_exists = false;
    for (name, selector) in fleets {
        if Some(name) == current {
            current_exists = true;
        }
        if selector.matches(labels) {
            matching.push(name.to_string());
        }
    }
    match matching.len() {
        0 => Placement::default(),
        1 => Placement {
            owner: matching.pop(),
            conflicts: Vec::new(),
        },
        _ => Placement {
            owner: current.filter(|_| current_exists).map(str::to_string),
            conflicts: matching,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_match_owns_none_frees_several_keep_the_owner() {
        let berlin = Selector::parse("site=berlin").unwrap();
        let gpu = Selector::parse("gpu").unwrap();
        let fleets = [("berlin", &berlin), ("gpu", &gpu)];
        let device = labels(&[("site", "berlin")]);
        assert_eq!(
            place(fleets, &device, None).owner.as_deref(),
            Some("berlin")
        );
        assert_eq!(
            place(fleets, &labels(&[]), Some("berlin")),
            Placement::default()
        );

        let both = labels(&[("site", "berlin"), ("gpu", "")]);
        let placed = place(fleets, &both, Some("gpu"));
        assert_eq!(placed.owner.as_deref(), Some("gpu"));
        assert_eq!(placed.conflicts, ["berlin", "gpu"]);
        assert_eq!(place(fleets, &both, None).owner, None, "never guess");
        assert_eq!(
            place(fleets, &both, Some("deleted")).owner,
            None,
            "a fleet that no longer exists owns nothing"
        );
    }
}
