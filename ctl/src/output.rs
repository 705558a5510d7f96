//! Rendering results as a table, JSON or YAML.

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Prints `items` in `format`; `single` prints one object instead of a list in JSON/YAML.
pub fn print<T: Serialize>(
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
        Format::Table => print!("{}", table(header, items.iter().map(row).collect())),
    }
    Ok(())
}

/// Left-aligned columns separated by three spaces, like kubectl.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
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
    #[test]
    fn table_aligns_columns() {
        let text = super::table(
            &["NAME", "STATE"],
            vec![vec!["a-long-name".into(), "x".into()]],
        );
        assert_eq!(text, "NAME          STATE\na-long-name   x\n");
    }
}
