//! `flotctl edit`: a device or fleet as YAML in `$VISUAL`/`$EDITOR`, applied when saved with
//! changes (read-only fields such as status are ignored, as `apply` ignores them). A refused edit
//! keeps the file and says where.

use crate::apply::apply_documents;
use crate::output::Format;
use crate::resources::{self, parse_documents};
use crate::{devices, fleets};
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::PathBuf;
use tonic::transport::Channel;

const HEADER: &str = "# Edit and save to apply: metadata.labels and spec. Status and other read-only fields are\n# ignored. Saving it unchanged, or empty, cancels.\n";

/// What to edit.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Device,
    Fleet,
}

/// A private file (0600) for the edit: the document may hold secrets (file contents). Kept, not
/// removed on drop: a refused edit stays for the user.
fn edit_file(kind: Kind, name: &str, text: &str) -> Result<PathBuf> {
    let kind = match kind {
        Kind::Device => "device",
        Kind::Fleet => "fleet",
    };
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (mut file, path) = tempfile::Builder::new()
        .prefix(&format!("flotctl-edit-{kind}-{safe}-"))
        .suffix(".yaml")
        .tempfile()
        .context("creating the file to edit")?
        .keep()
        .context("keeping the file to edit")?;
    file.write_all(text.as_bytes())?;
    Ok(path)
}

/// Runs the user's editor on `path` (`$VISUAL`, else `$EDITOR`, else `vi`; arguments allowed).
fn run_editor(path: &std::path::Path) -> Result<()> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .with_context(|| format!("starting the editor {editor:?}"))?;
    if !status.success() {
        bail!("the editor {editor:?} failed ({status}); nothing was applied");
    }
    Ok(())
}

pub(crate) async fn edit(channel: Channel, format: Format, kind: Kind, name: String) -> Result<()> {
    let document = match kind {
        Kind::Device => yaml_serde::to_string(&resources::device_view(
            devices::fetch(channel.clone(), name.clone()).await?,
        ))?,
        Kind::Fleet => yaml_serde::to_string(&resources::fleet_view(
            fleets::fetch(channel.clone(), name.clone()).await?,
        ))?,
    };
    let original = format!("{HEADER}{document}");
    let path = edit_file(kind, &name, &original)?;
    run_editor(&path)?;
    let edited = std::fs::read_to_string(&path)?;
    let meaningful = edited
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    if edited == original || !meaningful {
        let _ = std::fs::remove_file(&path);
        eprintln!("edit cancelled, no changes made");
        return Ok(());
    }
    let applied = match parse_documents(&edited) {
        Ok(documents) => apply_documents(channel, format, documents, false).await,
        Err(error) => Err(error),
    };
    match applied {
        Ok(()) => {
            let _ = std::fs::remove_file(&path);
            Ok(())
        }
        Err(error) => Err(error.context(format!(
            "nothing was applied; your edit is kept in {}",
            path.display()
        ))),
    }
}
