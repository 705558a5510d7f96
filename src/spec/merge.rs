//! Layering of specs: a higher layer replaces files by path, units and containers by name and
//! resource monitors by what they watch; its
//! update commands run after the lower layer's. Used for fleet template < device overrides.

use super::DeviceSpec;

/// Replaces or appends, by key, the items of `upper` onto `lower`, keeping `lower`'s order.
fn overlay<T, K: PartialEq>(lower: &mut Vec<T>, upper: Vec<T>, key: impl Fn(&T) -> K) {
    for item in upper {
        match lower
            .iter_mut()
            .find(|existing| key(existing) == key(&item))
        {
            Some(existing) => *existing = item,
            None => lower.push(item),
        }
    }
}

impl DeviceSpec {
    /// This spec with `upper` laid over it.
    pub fn overlaid_with(mut self, upper: DeviceSpec) -> DeviceSpec {
        overlay(&mut self.files, upper.files, |f| f.path.clone());
        overlay(&mut self.units, upper.units, |u| u.name.clone());
        overlay(&mut self.containers, upper.containers, |c| c.name.clone());
        overlay(&mut self.resources, upper.resources, |r| {
            let (kind, path) = r.key();
            (kind, path.to_string())
        });
        self.before_update.extend(upper.before_update);
        self.after_update.extend(upper.after_update);
        // The device's own choice of agent, image or windows replaces the fleet's.
        self.agent = upper.agent.or(self.agent);
        self.os = upper.os.or(self.os);
        self.update_policy = upper.update_policy.or(self.update_policy);
        self
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::{CommandSpec, DeviceSpec, FileSpec};

    #[test]
    fn upper_wins_by_path_and_commands_append() {
        let command = |p: &str| CommandSpec {
            run: vec![p.into()],
            timeout_seconds: 5,
        };
        let lower = DeviceSpec {
            files: vec![FileSpec::new("/a", "fleet"), FileSpec::new("/b", "fleet")],
            before_update: vec![command("/fleet")],
            ..Default::default()
        };
        let upper = DeviceSpec {
            files: vec![FileSpec::new("/b", "device"), FileSpec::new("/c", "device")],
            before_update: vec![command("/device")],
            ..Default::default()
        };
        let merged = lower.overlaid_with(upper);
        let contents: Vec<(&str, &str)> = merged
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.content.as_str()))
            .collect();
        assert_eq!(
            contents,
            [("/a", "fleet"), ("/b", "device"), ("/c", "device")]
        );
        assert_eq!(
            merged.before_update,
            [command("/fleet"), command("/device")]
        );
    }
}
