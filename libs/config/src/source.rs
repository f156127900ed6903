//! From text and environment to a [`Config`], keeping track of where every value came from.
//!
//! The file is parsed into `toml`'s spanned document tree; each environment override is put
//! into that tree with a made-up span past the end of the text, so a deserialisation error
//! on it points back at its variable, and an error on a file value at its line. The tree is
//! then deserialised into [`Config`] (unknown keys refused), and its spans are kept per key
//! path so that validation errors can name lines too.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use crate::env::{EnvValue, Override};
use crate::error::{KeyPath, Location, Problem, UnknownKey};
use crate::schema::{Config, Origin};
use crate::ConfigError;

/// Parses `text` (from `file`, if it came from one), applies `overrides`, and deserialises
/// the result. Does not validate.
pub(crate) fn build(
    text: &str,
    file: Option<&Path>,
    overrides: &[Override],
) -> Result<Config, ConfigError> {
    let display = file.map_or_else(|| PathBuf::from("nanobox.toml"), Path::to_path_buf);
    let mut root = DeTable::parse(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        ConfigError::Syntax {
            file: display.clone(),
            line,
            column,
            message: e.message().to_owned(),
        }
    })?;

    let mut spans = EnvSpans::new(text.len());
    for o in overrides {
        apply(root.get_mut(), o, &mut spans);
    }

    let mut nodes = Vec::new();
    collect(root.get_ref(), &KeyPath::root(), &mut nodes);
    let locate = |span: &Range<usize>| -> Location {
        match spans.var(span.start) {
            Some(var) => Location::Env {
                var: var.to_owned(),
            },
            None => Location::File {
                file: display.clone(),
                line: line_column(text, span.start).0,
            },
        }
    };

    match Config::deserialize(toml::de::Deserializer::from(root)) {
        Ok(mut config) => {
            let mut locations = BTreeMap::new();
            // Key spans first, so a table keeps its header line rather than an item's.
            for node in nodes.iter().rev() {
                locations.insert(node.path.clone(), locate(&node.span));
            }
            config.origin = Origin {
                file: file.map(Path::to_path_buf),
                locations,
            };
            Ok(config)
        }
        Err(e) => Err(deserialize_error(&e, &nodes, &display, &locate)),
    }
}

/// A node of the document: a key, or an array item, with its span.
struct Node {
    path: KeyPath,
    span: Range<usize>,
    is_key: bool,
}

/// Every key and array item under `table`, keys before their values.
fn collect(table: &DeTable<'_>, path: &KeyPath, out: &mut Vec<Node>) {
    for (key, value) in table.iter() {
        let path = path.key(key.get_ref());
        out.push(Node {
            path: path.clone(),
            span: key.span(),
            is_key: true,
        });
        collect_value(value, &path, out);
    }
}

fn collect_value(value: &Spanned<DeValue<'_>>, path: &KeyPath, out: &mut Vec<Node>) {
    match value.get_ref() {
        DeValue::Table(table) => collect(table, path, out),
        DeValue::Array(items) => {
            out.push(Node {
                path: path.clone(),
                span: value.span(),
                is_key: false,
            });
            for (i, item) in items.iter().enumerate() {
                let item_path = path.index(i);
                out.push(Node {
                    path: item_path.clone(),
                    span: item.span(),
                    is_key: false,
                });
                collect_value(item, &item_path, out);
            }
        }
        _ => out.push(Node {
            path: path.clone(),
            span: value.span(),
            is_key: false,
        }),
    }
}

/// Turns a deserialisation error into one naming the key and its line or variable.
fn deserialize_error(
    e: &toml::de::Error,
    nodes: &[Node],
    file: &Path,
    locate: &dyn Fn(&Range<usize>) -> Location,
) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    // The smallest node around the error; among equals, the deepest.
    let node = nodes
        .iter()
        .filter(|n| n.span.start <= span.start && span.end <= n.span.end.max(n.span.start + 1))
        .min_by_key(|n| (n.span.len(), usize::MAX - n.path.segments().len()));
    let path = node.map_or_else(KeyPath::root, |n| n.path.clone());
    let location = locate(&span);
    let message = e.message();

    if let Some(rest) = message.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or_default().to_owned();
        let table = path.parent().unwrap_or_else(KeyPath::root);
        let expected_names = backticked(rest.split_once(", ").map_or("", |(_, e)| e));
        let suggestion = closest(&key, expected_names.iter().map(String::as_str));
        let expected = rest
            .split_once(", ")
            .map_or_else(String::new, |(_, e)| e.to_owned());
        if let (Location::File { line, .. }, true) = (&location, node.is_some_and(|n| n.is_key)) {
            return ConfigError::UnknownKey(Box::new(UnknownKey {
                file: file.to_path_buf(),
                line: *line,
                table: table.table(),
                key,
                suggestion,
                expected,
            }));
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or_default();
        return ConfigError::Value(Problem {
            key: path.key(key),
            location,
            message: "required key is missing".to_owned(),
        });
    }
    ConfigError::Value(Problem {
        key: path,
        location,
        message: polish(message),
    })
}

/// Serde's wording made plainer: TOML types rather than Rust ones, hints for addresses.
fn polish(message: &str) -> String {
    let mut text = message.replace("unknown variant", "unknown value");
    if let Some((head, _)) = text.split_once(", expected struct ") {
        text = format!("{head}, expected a table");
    }
    for (rust, plain) in [
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer below 2^32"),
        (
            "expected u16",
            "expected a non-negative integer below 65536",
        ),
        ("expected u8", "expected a non-negative integer below 256"),
        ("expected i64", "expected an integer"),
        ("expected a string", "expected a string"),
    ] {
        if let Some(head) = text.strip_suffix(rust) {
            text = format!("{head}{plain}");
        }
    }
    if text == "invalid socket address syntax" {
        text.push_str(" (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)");
    } else if text == "invalid IP address syntax" {
        text.push_str(" (expected an address such as 10.100.0.1)");
    }
    text
}

/// The names between backticks in `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_owned())
        .collect()
}

/// The candidate closest to `word` if it is close enough to be a likely typo (at most two
/// edits, fewer than half the word).
pub(crate) fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let limit = (word.chars().count() / 2).clamp(1, 2);
    candidates
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

/// Edit distance with adjacent transpositions (optimal string alignment).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// 1-based line and column of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(1, |l| l.chars().count() + 1);
    (line, column)
}

/// Spans past the end of the text, handed out to environment overrides, and which
/// variable each belongs to.
struct EnvSpans {
    next: usize,
    owners: Vec<(Range<usize>, String)>,
}

impl EnvSpans {
    fn new(text_len: usize) -> Self {
        Self {
            next: text_len + 1,
            owners: Vec::new(),
        }
    }

    /// A fresh block of `len` positions owned by `var`.
    fn block(&mut self, len: usize, var: &str) -> usize {
        let start = self.next;
        self.next += len + 1;
        self.owners.push((start..start + len, var.to_owned()));
        start
    }

    /// The variable owning position `at`, if it is an override's.
    fn var(&self, at: usize) -> Option<&str> {
        self.owners
            .iter()
            .find(|(range, _)| range.contains(&at))
            .map(|(_, var)| var.as_str())
    }
}

/// Puts one override into the document, replacing the file's value of the key.
fn apply<'i>(root: &mut DeTable<'i>, o: &'i Override, spans: &mut EnvSpans) {
    if !root.contains_key(o.section) {
        let at = spans.block(2, &o.var);
        root.insert(
            Spanned::new(at..at + 1, Cow::Borrowed(o.section)),
            Spanned::new(at + 1..at + 2, DeValue::Table(DeTable::new())),
        );
    }
    let Some(DeValue::Table(section)) = root.get_mut(o.section).map(Spanned::get_mut) else {
        // Not a table in the file: deserialisation reports that, with its line.
        return;
    };
    let items = match &o.value {
        EnvValue::List(items) => items.len(),
        _ => 0,
    };
    // key: [at, at+1); value: [at+1, at+2+items); item i: [at+2+i, at+3+i).
    let at = spans.block(items + 2, &o.var);
    let value_span = at + 1..at + 2 + items;
    let value = match &o.value {
        EnvValue::Str(s) => DeValue::String(Cow::Borrowed(s.as_str())),
        EnvValue::Bool(b) => DeValue::Boolean(*b),
        EnvValue::Int(digits) => match DeValue::parse(digits) {
            Ok(parsed) => parsed.into_inner(),
            // Checked to be an i64 already; keep it a string so the error names the key.
            Err(_) => DeValue::String(Cow::Borrowed(digits.as_str())),
        },
        EnvValue::List(items) => {
            let mut array = DeArray::new();
            for (i, item) in items.iter().enumerate() {
                array.push(Spanned::new(
                    at + 2 + i..at + 3 + i,
                    DeValue::String(Cow::Borrowed(item.as_str())),
                ));
            }
            DeValue::Array(array)
        }
    };
    section.remove(o.key);
    section.insert(
        Spanned::new(at..at + 1, Cow::Borrowed(o.key)),
        Spanned::new(value_span, value),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 8), (2, 3));
        assert_eq!(line_column(text, 100), (3, 1));
    }

    #[test]
    fn typos_are_close() {
        let keys = ["listen_addr", "node_id", "state_dir"];
        assert_eq!(
            closest("listen_adr", keys.into_iter()).as_deref(),
            Some("listen_addr")
        );
        assert_eq!(
            closest("agnet", ["api", "agent"].into_iter()).as_deref(),
            Some("agent")
        );
        assert_eq!(closest("colour", keys.into_iter()), None);
    }
}
