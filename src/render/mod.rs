//! Rendering a device's spec: the fleet template (MiniJinja, sandboxed) evaluated with the device's
//! name and labels, then the device's own overrides laid on top. Pure: no I/O.
//!
//! Every string of a template spec may be a template (`{{ device.labels.site }}`). Printing a label
//! the device lacks is an error unless the fleet gives a default (`defaults.labels`) or the
//! template does (`{{ device.labels.site | default("lab") }}`).

mod reads;
mod size;

pub use reads::DeviceReads;
pub use size::MAX_TEMPLATE_BYTES;

use crate::spec::{DeviceSpec, SpecError};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// Work budget of one render: enough for any sensible loop, not for a runaway one.
const RENDER_FUEL: u64 = 100_000;
const RECURSION_LIMIT: usize = 32;

/// Why a template could not be compiled, or could not be rendered for one device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RenderError {
    /// The template field, e.g. `template.files[0].content`.
    pub field: String,
    /// What is wrong there.
    pub reason: String,
}

/// What a template sees of a device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceContext<'a> {
    /// `device.id`.
    pub id: &'a str,
    /// `device.name`.
    pub name: &'a str,
    /// `device.labels`.
    pub labels: &'a BTreeMap<String, String>,
}

/// A fleet template, compiled once and rendered for each of its devices.
pub struct CompiledTemplate {
    env: Environment<'static>,
    /// The template spec as JSON; strings that are templates are rendered by their JSON path.
    skeleton: Value,
    label_defaults: BTreeMap<String, String>,
    fleet: String,
    /// What the templated strings read of a device.
    reads: DeviceReads,
    /// Tells compilations apart for as long as the process runs (never reused).
    id: u64,
}

/// Source of `CompiledTemplate::id`.
static COMPILATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl std::fmt::Debug for CompiledTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledTemplate")
            .field("fleet", &self.fleet)
            .finish_non_exhaustive()
    }
}

fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// Calls `visit(path, string)` for every string in `value`, depth first, in a fixed order.
fn walk_strings(
    value: &mut Value,
    path: &mut String,
    visit: &mut dyn FnMut(&str, &mut String) -> Result<(), RenderError>,
) -> Result<(), RenderError> {
    match value {
        Value::String(s) => visit(path, s),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk_strings(item, path, visit)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                walk_strings(item, path, visit)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn sandbox() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env
}

fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    if let Some(detail) = error.detail()
        && !text.contains(detail)
    {
        text = format!("{text}: {detail}");
    }
    text
}

impl CompiledTemplate {
    /// Compiles every templated string of `template`; a syntax error names its field.
    pub fn compile(
        fleet: &str,
        template: &DeviceSpec,
        label_defaults: BTreeMap<String, String>,
    ) -> Result<CompiledTemplate, RenderError> {
        let mut skeleton = serde_json::to_value(template).map_err(|e| RenderError {
            field: "template".into(),
            reason: e.to_string(),
        })?;
        let mut env = sandbox();
        let mut reads = DeviceReads::default();
        let mut path = "template".to_string();
        walk_strings(&mut skeleton, &mut path, &mut |path, s| {
            if is_template(s) {
                env.add_template_owned(path.to_string(), s.clone())
                    .map_err(|e| RenderError {
                        field: path.to_string(),
                        reason: describe(&e),
                    })?;
                // Just compiled, so it is there; its analysis re-parses the same source.
                if let Ok(template) = env.get_template(path) {
                    let paths = template.undeclared_variables(true);
                    reads.add_paths(paths.iter().map(String::as_str));
                }
                size::check(s).map_err(|e| RenderError {
                    field: path.to_string(),
                    reason: e.to_string(),
                })?;
            }
            Ok(())
        })?;
        Ok(CompiledTemplate {
            env,
            skeleton,
            label_defaults,
            fleet: fleet.to_string(),
            reads,
            id: COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Identifies this compilation: renders by two compilations are never taken for each other.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The inputs of `device` this template's output depends on, as one string: devices with equal
    /// keys get equal renders (the fleet's label defaults applied, as rendering does).
    pub fn device_key(&self, device: &DeviceContext<'_>) -> String {
        self.reads
            .key(device.id, device.name, device.labels, &self.label_defaults)
    }

    /// The template spec for `device`, before overrides.
    pub fn render(&self, device: &DeviceContext<'_>) -> Result<DeviceSpec, RenderError> {
        let mut labels = self.label_defaults.clone();
        labels.extend(device.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        let context = minijinja::context! {
            device => minijinja::context! {
                id => device.id,
                name => device.name,
                labels => labels,
            },
            fleet => minijinja::context! { name => &self.fleet },
        };
        let mut value = self.skeleton.clone();
        let mut path = "template".to_string();
        walk_strings(&mut value, &mut path, &mut |path, s| {
            if let Ok(template) = self.env.get_template(path) {
                *s = template.render(&context).map_err(|e| RenderError {
                    field: path.to_string(),
                    reason: describe(&e),
                })?;
            }
            Ok(())
        })?;
        serde_json::from_value(value).map_err(|e| RenderError {
            field: "template".into(),
            reason: format!("rendered spec is not a valid spec: {e}"),
        })
    }
}

fn spec_error(error: SpecError) -> RenderError {
    RenderError {
        field: error.field(),
        reason: format!("rendered spec is invalid: {}", error.reason),
    }
}

/// A device's complete spec: its fleet's template (if it has a fleet) with its own overrides on
/// top, normalised and validated.
pub fn render_device(
    template: Option<&CompiledTemplate>,
    device: &DeviceContext<'_>,
    overrides: &DeviceSpec,
) -> Result<DeviceSpec, RenderError> {
    let base = match template {
        Some(template) => template.render(device)?,
        None => DeviceSpec::default(),
    };
    let spec = base.overlaid_with(overrides.clone()).normalized();
    spec.validate().map_err(spec_error)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FileSpec;
    use proptest::prelude::*;

    fn template(content: &str) -> DeviceSpec {
        DeviceSpec {
            files: vec![FileSpec::new("/etc/site", content)],
            ..Default::default()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn device<'a>(name: &'a str, labels: &'a BTreeMap<String, String>) -> DeviceContext<'a> {
        DeviceContext {
            id: "id-1",
            name,
            labels,
        }
    }

    #[test]
    fn renders_name_labels_and_defaults() {
        let compiled = CompiledTemplate::compile(
            "web",
            &template(
                "site={{ device.labels.site }} tier={{ device.labels.tier | default('prod') }} host={{ device.name }} fleet={{ fleet.name }}\n",
            ),
            labels(&[("site", "unknown")]),
        )
        .unwrap();
        let berlin = labels(&[("site", "berlin")]);
        let spec = compiled.render(&device("gw-1", &berlin)).unwrap();
        assert_eq!(
            spec.files[0].content,
            "site=berlin tier=prod host=gw-1 fleet=web\n"
        );
        let none = labels(&[]);
        let spec = compiled.render(&device("gw-2", &none)).unwrap();
        assert!(spec.files[0].content.starts_with("site=unknown "));
    }

    #[test]
    fn a_missing_label_fails_that_device_only_with_the_field() {
        let compiled = CompiledTemplate::compile(
            "web",
            &template("{{ device.labels.site }}"),
            BTreeMap::new(),
        )
        .unwrap();
        let none = labels(&[]);
        let error = compiled.render(&device("gw", &none)).unwrap_err();
        assert_eq!(error.field, "template.files[0].content");
        assert!(error.reason.contains("undefined"), "{error}");
        let ok = labels(&[("site", "x")]);
        assert!(compiled.render(&device("gw", &ok)).is_ok());
    }

    #[test]
    fn syntax_errors_and_runaway_loops_are_refused() {
        let error =
            CompiledTemplate::compile("web", &template("{{ oops"), BTreeMap::new()).unwrap_err();
        assert_eq!(error.field, "template.files[0].content");
        let looping = CompiledTemplate::compile(
            "web",
            &template(
                "{% for i in range(1000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
            ),
            BTreeMap::new(),
        )
        .unwrap();
        let none = labels(&[]);
        let error = looping.render(&device("gw", &none)).unwrap_err();
        assert!(error.reason.contains("fuel"), "{error}");
    }

    #[test]
    fn overrides_win_and_rendered_paths_are_validated() {
        let compiled = CompiledTemplate::compile(
            "web",
            &DeviceSpec {
                files: vec![
                    FileSpec::new("/etc/a", "fleet"),
                    FileSpec::new("{{ device.labels.dir }}/b", "fleet"),
                ],
                ..Default::default()
            },
            BTreeMap::new(),
        )
        .unwrap();
        let good = labels(&[("dir", "/opt")]);
        let overrides = template("device");
        let spec = render_device(Some(&compiled), &device("gw", &good), &overrides).unwrap();
        let paths: Vec<&str> = spec.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/etc/a", "/etc/site", "/opt/b"]);
        let bad = labels(&[("dir", "relative")]);
        let error = render_device(Some(&compiled), &device("gw", &bad), &overrides).unwrap_err();
        assert_eq!(error.field, "spec.files[2].path");
    }

    fn label_listing() -> CompiledTemplate {
        let template = DeviceSpec {
            files: vec![
                FileSpec::new("/etc/site", "{{ device.labels.site | default('none') }}"),
                FileSpec::new(
                    "/etc/all",
                    "{% for k, v in device.labels|items %}{{ k }}={{ v }};{% endfor %}{{ device.name }}",
                ),
            ],
            ..Default::default()
        };
        CompiledTemplate::compile("web", &template, BTreeMap::new()).unwrap()
    }

    proptest! {
        #[test]
        fn rendering_is_deterministic(
            site in "[a-z]{0,8}",
            extra in prop::collection::btree_map("[a-z]{1,5}", "[a-z0-9]{0,5}", 0..6),
            name in "[a-z][a-z0-9-]{0,10}",
        ) {
            let compiled = label_listing();
            let mut device_labels = extra.clone();
            device_labels.insert("site".into(), site);
            let context = device(&name, &device_labels);
            let a = render_device(Some(&compiled), &context, &DeviceSpec::default()).unwrap();
            let b = render_device(Some(&compiled), &context, &DeviceSpec::default()).unwrap();
            prop_assert_eq!(a.content_hash(), b.content_hash());
            // Compiling again (as after a restart) renders the same version too.
            let again = label_listing();
            let c = render_device(Some(&again), &context, &DeviceSpec::default()).unwrap();
            prop_assert_eq!(a, c);
        }

        /// Devices that agree on what a template reads render alike, whatever the template: the
        /// key the catalog shares renders by is never too small.
        #[test]
        fn devices_with_equal_keys_render_alike(
            parts in prop::collection::vec(
                prop_oneof![
                    Just("{{ device.labels.site }}"), Just("{{ device.labels.tier | default('t') }}"),
                    Just("{{ device.name }}"), Just("{{ device.id }}"), Just("{{ fleet.name }}"),
                    Just("{{ device['labels']['site'] | default('-') }}"),
                    Just("{{ device.labels['tier'] | default('-') }}"),
                    Just("{% set d = device %}{{ d.labels.site | default('') }}"),
                    Just("{% set l = device.labels %}{{ l.tier | default('') }}"),
                    Just("{% for k, v in device.labels|items %}{{ k }}={{ v }};{% endfor %}"),
                    Just("{{ device.labels | length }}"), Just("{{ device | length }}"),
                    Just("{% if device.labels.site == 'a' %}A{% else %}B{% endif %}"),
                    Just("{{ device.colour | default('none') }}"), Just("plain "),
                ],
                0..5,
            ),
            one in prop::collection::btree_map(prop_oneof![Just("site"), Just("tier"), Just("x")], "[ab]{0,1}", 0..3),
            two in prop::collection::btree_map(prop_oneof![Just("site"), Just("tier"), Just("x")], "[ab]{0,1}", 0..3),
            names in (prop_oneof![Just("n1"), Just("n2")], prop_oneof![Just("n1"), Just("n2")]),
            ids in (prop_oneof![Just("i1"), Just("i2")], prop_oneof![Just("i1"), Just("i2")]),
            with_default in any::<bool>(),
        ) {
            let body = parts.concat();
            let defaults = if with_default { labels(&[("site", "dflt")]) } else { BTreeMap::new() };
            let template = DeviceSpec {
                files: vec![FileSpec::new("/etc/keyed", &body)],
                ..Default::default()
            };
            let compiled = CompiledTemplate::compile("web", &template, defaults).unwrap();
            let first: BTreeMap<String, String> = one.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            let second: BTreeMap<String, String> = two.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            let a = DeviceContext { id: ids.0, name: names.0, labels: &first };
            let b = DeviceContext { id: ids.1, name: names.1, labels: &second };
            if compiled.device_key(&a) == compiled.device_key(&b) {
                let render_a = compiled.render(&a).map(|s| s.content_hash());
                let render_b = compiled.render(&b).map(|s| s.content_hash());
                prop_assert_eq!(render_a, render_b, "{} for {:?} and {:?}", body, a, b);
            }
        }

        /// Whatever a template says, compiling it and rendering it answer, with a field on error.
        #[test]
        fn arbitrary_templates_compile_or_are_refused_and_render_or_fail_cleanly(
            body in prop_oneof![
                "\\PC{0,60}",
                prop::collection::vec(
                    prop_oneof![
                        Just("{{".to_string()), Just("}}".to_string()), Just("{%".to_string()),
                        Just("%}".to_string()), Just(" for x in ".to_string()), Just(" endfor ".to_string()),
                        Just(" set a = ".to_string()), Just(" if ".to_string()), Just(" endif ".to_string()),
                        Just("device.labels".to_string()), Just("device.name".to_string()),
                        Just(" ~ ".to_string()), Just(" * ".to_string()), Just(" | ".to_string()),
                        Just("upper".to_string()), Just("range(".to_string()), Just(")".to_string()),
                        "[a-z0-9'\" ]{0,6}",
                    ],
                    0..16,
                ).prop_map(|parts| parts.concat()),
            ],
        ) {
            let template = DeviceSpec {
                files: vec![FileSpec::new("/etc/fuzzed", &body)],
                ..Default::default()
            };
            match CompiledTemplate::compile("fuzz", &template, BTreeMap::new()) {
                Err(error) => prop_assert!(error.field.starts_with("template")),
                Ok(compiled) => {
                    let labels = labels(&[("site", "lab")]);
                    if let Ok(spec) = render_device(Some(&compiled), &device("gw", &labels), &DeviceSpec::default()) {
                        prop_assert!(spec.files[0].content.len() <= MAX_TEMPLATE_BYTES as usize);
                    }
                }
            }
        }
    }
}
