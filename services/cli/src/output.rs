//! How the API commands print: tables for people, the API's own JSON with `--json`.

use serde_json::Value;

use crate::client::CliError;

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(format!("printing JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Prints a table with a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
}

/// An enum value without its type prefix (`SANDBOX_STATE_RUNNING` -> `RUNNING`).
pub fn state_name(v: &Value, prefix: &str) -> String {
    let s = v.as_str().unwrap_or("");
    s.strip_prefix(prefix).unwrap_or(s).to_owned()
}

/// A byte count for people (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_states_read_as_people_expect() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(
            state_name(&Value::from("SANDBOX_STATE_RUNNING"), "SANDBOX_STATE_"),
            "RUNNING"
        );
    }
}
