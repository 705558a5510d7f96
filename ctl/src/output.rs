//! Rendering results as a table, JSON or YAML.

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;
use std::borrow::Cow;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    /// A table with more columns, where the resource has them (devices).
    Wide,
    Json,
    Yaml,
    /// `kind/name` per resource, one a line, for scripts (`flotctl get devices -o name | ...`).
    Name,
}

/// Prints `items` in `format`; `single` prints one object instead of a list in JSON/YAML.
pub(crate) fn print<T: Serialize>(
    format: Format,
    items: &[T],
    single: bool,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    match format {
        Format::Json if single && items.len() == 1 => {
            println!("{}", serde_json::to_string_pretty(&items[0])?)
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(items)?),
        Format::Yaml if single && items.len() == 1 => {
            print!("{}", yaml_serde::to_string(&items[0])?)
        }
        Format::Yaml => print!("{}", yaml_serde::to_string(items)?),
        Format::Table | Format::Wide => {
            print!("{}", table(header, items.iter().map(row).collect()))
        }
        Format::Name => {
            for item in items {
                println!(
                    "{}",
                    terminal_safe(&name_of(&serde_json::to_value(item)?), false)
                );
            }
        }
    }
    Ok(())
}

/// `device/edge-1` for a document with `kind` and `metadata.name`; a record without them is named
/// by its `name` (or `serial`) field.
pub(crate) fn name_of(document: &serde_json::Value) -> String {
    let kind = document["kind"]
        .as_str()
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let name = document["metadata"]["name"]
        .as_str()
        .or_else(|| document["name"].as_str())
        .or_else(|| document["serial"].as_str())
        .unwrap_or_default();
    if kind.is_empty() {
        name.to_string()
    } else {
        format!("{kind}/{name}")
    }
}

/// Text that came from the control plane (and so, possibly, from a device) made safe to print on a
/// terminal: control characters — escape sequences above all — are shown as `\x1b`-style escapes
/// instead of being interpreted. With `keep_newlines`, line breaks and tabs pass (multi-line
/// views); otherwise they are escaped too (table cells). JSON and YAML output is never filtered.
pub(crate) fn terminal_safe(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && !(keep_newlines && (c == '\n' || c == '\t'));
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut safe = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            let code = c as u32;
            if code <= 0xff {
                let _ = write!(safe, "\\x{code:02x}");
            } else {
                let _ = write!(safe, "\\u{{{code:x}}}");
            }
        } else {
            safe.push(c);
        }
    }
    Cow::Owned(safe)
}

/// Prints multi-line text made for the terminal (describe views), escaping control characters.
pub(crate) fn print_text(text: &str) {
    print!("{}", terminal_safe(text, true));
}

/// Left-aligned columns separated by three spaces, like kubectl.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|cell| terminal_safe(&cell, false).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut text = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("   ");
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{name_of, terminal_safe};

    #[test]
    fn names_documents_like_kubectl() {
        let device = serde_json::json!({"kind": "Device", "metadata": {"name": "edge-1"}});
        assert_eq!(name_of(&device), "device/edge-1");
        let enrollment = serde_json::json!({"name": "edge-2", "state": "PENDING"});
        assert_eq!(name_of(&enrollment), "edge-2");
        let certificate = serde_json::json!({"serial": "0a1b"});
        assert_eq!(name_of(&certificate), "0a1b");
    }

    #[test]
    fn escape_sequences_never_reach_the_terminal() {
        let hostile = "edge\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\nfake-row";
        let cell = terminal_safe(hostile, false);
        assert!(!cell.chars().any(char::is_control), "{cell}");
        assert_eq!(cell, "edge\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x0afake-row");
        let text = terminal_safe("Name: a\u{1b}[31m\nLabels:\tx\n", true);
        assert_eq!(text, "Name: a\\x1b[31m\nLabels:\tx\n");
        assert!(matches!(
            terminal_safe("plain", false),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn table_cells_are_escaped() {
        let text = super::table(&["NAME"], vec![vec!["a\u{1b}[2Jb".into()]]);
        assert_eq!(text, "NAME\na\\x1b[2Jb\n");
    }

    #[test]
    fn table_aligns_columns() {
        let text = super::table(
            &["NAME", "STATE"],
            vec![vec!["a-long-name".into(), "x".into()]],
        );
        assert_eq!(text, "NAME          STATE\na-long-name   x\n");
    }
}
