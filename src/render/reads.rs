//! What of a device a fleet template reads, found on its syntax tree, so that devices which agree
//! on it share one render: a template that prints only `device.labels.site` renders once per site,
//! not once per device. Pure.
//!
//! The analysis is MiniJinja's own (`Template::undeclared_variables` with nested paths): every
//! lookup of a context variable, followed through chains of attributes (`device.labels.site`).
//! Anything it cannot follow — a subscript, a filter or loop over a whole value, the bare
//! `device` — counts as reading the whole value it starts from, so the key is never too small.
//! The sandbox has no method callback, so `device.labels.items` reads the label `items`, just as
//! rendering does.

use std::collections::{BTreeMap, BTreeSet};

/// The part of the render context that comes from the device.
const DEVICE: &str = "device";

/// What the templates of one fleet read of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceReads {
    /// The whole device (its id, name and every label) is read.
    whole: bool,
    id: bool,
    name: bool,
    /// Every label (and which ones there are) is read.
    all_labels: bool,
    labels: BTreeSet<String>,
}

impl DeviceReads {
    /// Folds in one template's context lookups, as dotted paths (`device.labels.site`).
    pub fn add_paths<'a>(&mut self, paths: impl IntoIterator<Item = &'a str>) {
        for path in paths {
            let mut parts = path.split('.');
            if parts.next() != Some(DEVICE) {
                // `fleet.name` and the sandbox's globals are the same for every device; any other
                // name is undefined for all of them.
                continue;
            }
            match (parts.next(), parts.next()) {
                (None, _) => self.whole = true,
                (Some("id"), _) => self.id = true,
                (Some("name"), _) => self.name = true,
                (Some("labels"), None) => self.all_labels = true,
                (Some("labels"), Some(label)) => {
                    self.labels.insert(label.to_string());
                }
                // Any other attribute of `device` is undefined for every device.
                (Some(_), _) => {}
            }
        }
    }

    /// Whether no template reads anything of the device.
    pub fn is_constant(&self) -> bool {
        *self == DeviceReads::default()
    }

    /// The values these reads see for a device, as one string: two devices with equal keys render
    /// equally. A label the device lacks is taken from the fleet's `defaults`, as rendering does.
    pub fn key(
        &self,
        id: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        defaults: &BTreeMap<String, String>,
    ) -> String {
        let mut key = String::new();
        let mut push = |tag: &str, value: Option<&str>| {
            key.push_str(tag);
            // JSON quoting keeps values apart whatever they contain; absent differs from "".
            match value {
                Some(value) => key.push_str(&serde_json::Value::from(value).to_string()),
                None => key.push('-'),
            }
        };
        if self.whole || self.id {
            push("i", Some(id));
        }
        if self.whole || self.name {
            push("n", Some(name));
        }
        if self.whole || self.all_labels {
            let mut merged = defaults.clone();
            merged.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            for (label, value) in &merged {
                push("l", Some(label));
                push("=", Some(value));
            }
        } else {
            for label in &self.labels {
                let value = labels.get(label).or_else(|| defaults.get(label));
                push("l", value.map(String::as_str));
            }
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(paths: &[&str]) -> DeviceReads {
        let mut reads = DeviceReads::default();
        reads.add_paths(paths.iter().copied());
        reads
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    #[test]
    fn defaults_stand_in_for_missing_labels() {
        let defaults = labels(&[("site", "lab")]);
        for r in [reads(&["device.labels.site"]), reads(&["device.labels"])] {
            let defaulted = r.key("1", "a", &labels(&[]), &defaults);
            let explicit = r.key("1", "a", &labels(&[("site", "lab")]), &defaults);
            let other = r.key("1", "a", &labels(&[("site", "x")]), &defaults);
            assert_eq!(defaulted, explicit, "{r:?}");
            assert_ne!(defaulted, other, "{r:?}");
        }
    }

    #[test]
    fn only_what_is_read_tells_devices_apart() {
        let site = reads(&["device.labels.site", "fleet.name", "range"]);
        assert!(!site.is_constant());
        let berlin_a = site.key(
            "1",
            "a",
            &labels(&[("site", "berlin"), ("tier", "x")]),
            &none(),
        );
        let berlin_b = site.key("2", "b", &labels(&[("site", "berlin")]), &none());
        let paris = site.key("3", "c", &labels(&[("site", "paris")]), &none());
        let absent = site.key("4", "d", &labels(&[]), &none());
        let empty = site.key("5", "e", &labels(&[("site", "")]), &none());
        assert_eq!(berlin_a, berlin_b);
        assert_ne!(berlin_a, paris);
        assert_ne!(absent, empty, "an absent label is not an empty one");
        assert!(reads(&["fleet.name", "device.colour"]).is_constant());
    }

    #[test]
    fn whole_values_count_every_part() {
        for whole in [reads(&["device"]), reads(&["device.labels"])] {
            let one = whole.key("1", "a", &labels(&[("site", "berlin")]), &none());
            let more = whole.key("1", "a", &labels(&[("site", "berlin"), ("x", "")]), &none());
            assert_ne!(one, more, "{whole:?}: another label is another input");
        }
        let name = reads(&["device.name"]);
        assert_ne!(
            name.key("1", "a", &labels(&[]), &none()),
            name.key("1", "b", &labels(&[]), &none())
        );
        assert_eq!(
            name.key("1", "a", &labels(&[]), &none()),
            name.key("2", "a", &labels(&[]), &none())
        );
    }

    #[test]
    fn values_cannot_run_into_each_other() {
        let two = reads(&["device.labels.a", "device.labels.b"]);
        let left = two.key("1", "n", &labels(&[("a", "xl"), ("b", "")]), &none());
        let right = two.key("1", "n", &labels(&[("a", "x"), ("b", "l")]), &none());
        assert_ne!(left, right);
        let all = reads(&["device.labels"]);
        let left = all.key("1", "n", &labels(&[("a", "b=c")]), &none());
        let right = all.key("1", "n", &labels(&[("a=b", "c")]), &none());
        assert_ne!(left, right);
    }
}
