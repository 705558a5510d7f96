//! What `podman` must do to move containers from one spec to the next, and how to undo it. Pure.

use super::executor::CommandLine;
use flotilla::spec::{ContainerSpec, DeviceSpec};
use std::time::Duration;

const PULL_TIMEOUT: Duration = Duration::from_secs(600);
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);
/// Label carrying the definition hash, so an operator can see which spec made a container.
pub(super) const HASH_LABEL: &str = "io.flotilla.definition";

/// One podman step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ContainerAction {
    /// (Re)create the container from this definition.
    Run(ContainerSpec),
    /// Remove the container of this name.
    Remove(String),
}

impl ContainerAction {
    pub(super) fn command(&self) -> CommandLine {
        match self {
            ContainerAction::Run(c) => run_command(c),
            ContainerAction::Remove(name) => CommandLine::new(
                &["podman", "rm", "--force", "--ignore", name],
                PODMAN_TIMEOUT,
            ),
        }
    }
}

pub(super) fn pull_command(image: &str) -> CommandLine {
    CommandLine::new(&["podman", "pull", image], PULL_TIMEOUT)
}

pub(super) fn run_command(c: &ContainerSpec) -> CommandLine {
    let hash = c.definition_hash();
    let mut argv = vec![
        "podman".to_string(),
        "run".into(),
        "--detach".into(),
        "--replace".into(),
        "--name".into(),
        c.name.clone(),
        "--label".into(),
        format!("{HASH_LABEL}={}", &hash[..16]),
    ];
    for (key, value) in &c.env {
        argv.push("--env".into());
        argv.push(format!("{key}={value}"));
    }
    for port in &c.ports {
        argv.push("--publish".into());
        argv.push(port.clone());
    }
    for volume in &c.volumes {
        argv.push("--volume".into());
        argv.push(volume.clone());
    }
    argv.push(c.image.clone());
    argv.extend(c.command.iter().cloned());
    CommandLine {
        argv,
        timeout: PODMAN_TIMEOUT,
    }
}

fn find<'a>(spec: &'a DeviceSpec, name: &str) -> Option<&'a ContainerSpec> {
    spec.containers.iter().find(|c| c.name == name)
}

/// Images to pull before anything changes (so a missing image fails the update untouched).
pub(super) fn pulls(previous: &DeviceSpec, next: &DeviceSpec) -> Vec<String> {
    let mut images: Vec<String> = plan(previous, next)
        .into_iter()
        .filter_map(|a| match a {
            ContainerAction::Run(c) => Some(c.image),
            ContainerAction::Remove(_) => None,
        })
        .collect();
    images.dedup();
    images
}

/// Containers whose definition changed are recreated; dropped ones removed.
pub(super) fn plan(previous: &DeviceSpec, next: &DeviceSpec) -> Vec<ContainerAction> {
    let mut actions: Vec<ContainerAction> = next
        .containers
        .iter()
        .filter(|c| find(previous, &c.name) != Some(c))
        .map(|c| ContainerAction::Run(c.clone()))
        .collect();
    actions.extend(
        previous
            .containers
            .iter()
            .filter(|c| find(next, &c.name).is_none())
            .map(|c| ContainerAction::Remove(c.name.clone())),
    );
    actions
}

/// The steps that put back what `done` changed, as `previous` had it.
pub(super) fn undo(previous: &DeviceSpec, done: &[ContainerAction]) -> Vec<ContainerAction> {
    done.iter()
        .rev()
        .map(|action| {
            let name = match action {
                ContainerAction::Run(c) => &c.name,
                ContainerAction::Remove(name) => name,
            };
            match find(previous, name) {
                Some(before) => ContainerAction::Run(before.clone()),
                None => ContainerAction::Remove(name.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn web(image: &str) -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            image: image.into(),
            command: vec!["--port".into(), "80".into()],
            env: BTreeMap::from([("MODE".to_string(), "prod".to_string())]),
            ports: vec!["8080:80".into()],
            volumes: vec!["/srv/web:/data:ro".into()],
            drift: None,
        }
    }

    fn spec(containers: Vec<ContainerSpec>) -> DeviceSpec {
        DeviceSpec {
            containers,
            ..Default::default()
        }
    }

    #[test]
    fn recreates_changed_containers_with_the_exact_podman_command() {
        let v1 = spec(vec![web("web:1")]);
        let actions = plan(&DeviceSpec::default(), &v1);
        let hash = &web("web:1").definition_hash()[..16];
        assert_eq!(
            actions[0].command().display(),
            format!(
                "podman run --detach --replace --name web --label {HASH_LABEL}={hash} --env MODE=prod --publish 8080:80 --volume /srv/web:/data:ro web:1 --port 80"
            )
        );
        assert!(
            plan(&v1, &v1).is_empty(),
            "unchanged containers are left running"
        );
        assert_eq!(pulls(&v1, &spec(vec![web("web:2")])), ["web:2"]);
        let removed = plan(&v1, &DeviceSpec::default());
        assert_eq!(
            removed[0].command().display(),
            "podman rm --force --ignore web"
        );
    }

    #[test]
    fn undo_restores_previous_definitions() {
        let v1 = spec(vec![web("web:1")]);
        let v2 = spec(vec![web("web:2")]);
        let done = plan(&v1, &v2);
        assert_eq!(undo(&v1, &done), vec![ContainerAction::Run(web("web:1"))]);
        let fresh = plan(&DeviceSpec::default(), &v2);
        assert_eq!(
            undo(&DeviceSpec::default(), &fresh),
            vec![ContainerAction::Remove("web".into())]
        );
    }
}
