//! A credential's scope: the label selector that limits which devices and fleets it sees and
//! changes. A device is in scope when its labels match; a fleet when every device its selector
//! can match is in scope (its selector implies the scope's, requirement by requirement — a fleet
//! `site=a,role=kiosk` is inside the scope `site=a`, a fleet `role=kiosk` is not). Pure.

use crate::selector::{Requirement, Selector};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a caller may touch: everything, or what a selector allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope(Option<Selector>);

/// The values a requirement lets a label take: a finite set, or everything but a set; and whether
/// an absent label passes.
enum Allowed<'a> {
    Only(BTreeSet<&'a str>, bool),
    AllBut(BTreeSet<&'a str>, bool),
}

fn one(value: &str) -> BTreeSet<&str> {
    BTreeSet::from([value])
}

fn set(values: &BTreeSet<String>) -> BTreeSet<&str> {
    values.iter().map(String::as_str).collect()
}

fn allowed(requirement: &Requirement) -> Allowed<'_> {
    match requirement {
        Requirement::Exists(_) => Allowed::AllBut(BTreeSet::new(), false),
        Requirement::NotExists(_) => Allowed::Only(BTreeSet::new(), true),
        Requirement::Equals(_, v) => Allowed::Only(one(v), false),
        Requirement::NotEquals(_, v) => Allowed::AllBut(one(v), true),
        Requirement::In(_, s) => Allowed::Only(set(s), false),
        Requirement::NotIn(_, s) => Allowed::AllBut(set(s), true),
    }
}

/// Whether every label set `narrow` matches is matched by `wide` (both on the same key).
fn implies(narrow: &Requirement, wide: &Requirement) -> bool {
    use Allowed::*;
    if narrow.key() != wide.key() {
        return false;
    }
    match (allowed(narrow), allowed(wide)) {
        (Only(n, na), Only(w, wa)) => n.is_subset(&w) && (!na || wa),
        (Only(n, na), AllBut(w, wa)) => n.is_disjoint(&w) && (!na || wa),
        (AllBut(..), Only(..)) => false,
        (AllBut(n, na), AllBut(w, wa)) => w.is_subset(&n) && (!na || wa),
    }
}

impl Scope {
    /// No restriction.
    pub fn everything() -> Scope {
        Scope(None)
    }

    /// The devices `selector` matches; none or an empty one is everything.
    pub fn of(selector: Option<Selector>) -> Scope {
        Scope(selector.filter(|s| !s.is_empty()))
    }

    /// Whether nothing is restricted.
    pub fn is_everything(&self) -> bool {
        self.0.is_none()
    }

    /// The restricting selector, if any.
    pub fn selector(&self) -> Option<&Selector> {
        self.0.as_ref()
    }

    /// Whether a device with these labels is in scope.
    pub fn covers_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.as_ref().is_none_or(|s| s.matches(labels))
    }

    /// Whether every device `selector` can match is in scope.
    pub fn covers_selector(&self, selector: &Selector) -> bool {
        self.0.as_ref().is_none_or(|scope| {
            scope.requirements().iter().all(|wide| {
                selector
                    .requirements()
                    .iter()
                    .any(|narrow| implies(narrow, wide))
            })
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => write!(f, "everything"),
            Some(selector) => write!(f, "{selector}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope(text: &str) -> Scope {
        Scope::of(Some(Selector::parse(text).unwrap()))
    }

    fn covers(scope_text: &str, fleet: &str) -> bool {
        scope(scope_text).covers_selector(&Selector::parse(fleet).unwrap())
    }

    #[test]
    fn a_fleet_is_in_scope_only_when_it_cannot_reach_outside() {
        assert!(covers("site=a", "site=a"));
        assert!(covers("site=a", "site=a,role=kiosk"));
        assert!(covers("site=a", "site in (a)"));
        assert!(!covers("site=a", "role=kiosk"));
        assert!(!covers("site=a", "site in (a,b)"));
        assert!(
            !covers("site=a", ""),
            "the empty selector matches everything"
        );
        assert!(covers("site in (a,b)", "site=b"));
        assert!(covers("site in (a,b)", "site in (a,b)"));
        assert!(covers("site!=c", "site=a"));
        assert!(covers("site!=c", "site notin (c,d)"));
        assert!(!covers("site!=c", "site notin (d)"));
        assert!(covers("site notin (c,d)", "!site"));
        assert!(covers("site", "site=a"));
        assert!(
            !covers("site", "site!=a"),
            "site!=a matches devices without site"
        );
        assert!(covers("!legacy", "!legacy,site=a"));
        assert!(covers("site=a,tier=prod", "tier=prod,site=a,role=x"));
        assert!(!covers("site=a,tier=prod", "site=a"));
        assert!(Scope::everything().covers_selector(&Selector::everything()));
    }

    #[test]
    fn a_device_is_in_scope_when_its_labels_match() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(scope("site=a").covers_labels(&labels(&[("site", "a")])));
        assert!(!scope("site=a").covers_labels(&labels(&[("site", "b")])));
        assert!(!scope("site=a").covers_labels(&labels(&[])));
        assert!(Scope::everything().covers_labels(&labels(&[])));
        assert_eq!(scope("site=a").to_string(), "site=a");
    }

    fn requirement() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec!["site", "tier"]);
        let value = prop::sample::select(vec!["a", "b", "c"]);
        (key, value.clone(), value, 0..6usize).prop_map(|(k, v, w, kind)| match kind {
            0 => k.to_string(),
            1 => format!("!{k}"),
            2 => format!("{k}={v}"),
            3 => format!("{k}!={v}"),
            4 => format!("{k} in ({v},{w})"),
            _ => format!("{k} notin ({v},{w})"),
        })
    }

    fn label_sets() -> Vec<BTreeMap<String, String>> {
        let values = [None, Some("a"), Some("b"), Some("c"), Some("d")];
        let mut sets = Vec::new();
        for site in values {
            for tier in values {
                let mut labels = BTreeMap::new();
                if let Some(v) = site {
                    labels.insert("site".to_string(), v.to_string());
                }
                if let Some(v) = tier {
                    labels.insert("tier".to_string(), v.to_string());
                }
                sets.push(labels);
            }
        }
        sets
    }

    proptest! {
        /// Whenever a fleet counts as in scope, no device it matches is outside the scope.
        #[test]
        fn covered_fleets_never_reach_outside(
            scope_parts in prop::collection::vec(requirement(), 1..3),
            fleet_parts in prop::collection::vec(requirement(), 0..4),
        ) {
            let scope_selector = Selector::parse(&scope_parts.join(",")).unwrap();
            let fleet = Selector::parse(&fleet_parts.join(",")).unwrap();
            let scope = Scope::of(Some(scope_selector.clone()));
            if scope.covers_selector(&fleet) {
                for labels in label_sets() {
                    prop_assert!(!fleet.matches(&labels) || scope_selector.matches(&labels),
                        "{fleet} matches {labels:?} outside {scope_selector}");
                }
            }
        }
    }
}
