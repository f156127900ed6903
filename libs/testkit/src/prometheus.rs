//! Reading a service's `/metrics` in tests: [`scrape`] fetches the text exposition format
//! and [`Scrape::value`] finds one sample by name and labels.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// One scrape of a `/metrics` endpoint.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The body as served.
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// Parses the text exposition format (comments and malformed lines skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the sample `name` whose labels include `labels` (others may be
    /// there too); the first if several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|have| have == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// The sum of every sample `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|have| have == v))
            })
            .map(|(_, _, v)| *v)
            .sum()
    }

    /// Whether the HELP line of `name` is there (the series is described).
    pub fn described(&self, name: &str) -> bool {
        self.text.contains(&format!("# HELP {name} "))
    }
}

/// `name{k="v",...} value` (or `name value`).
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // Values here never hold escaped quotes (ids, names, numbers).
        let (value, after) = after.split_once('"')?;
        map.insert(key.trim_start_matches(',').to_owned(), value.to_owned());
        rest = after;
    }
    Some((name.to_owned(), map, value))
}

/// Fetches `http://<addr>/metrics` and parses it; panics when the endpoint does not
/// answer 200.
pub fn scrape(addr: &str) -> Scrape {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("asking {addr} for /metrics: {e}"));
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("reading /metrics of {addr}: {e}"));
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("/metrics of {addr}: no HTTP answer: {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "/metrics of {addr}: {head}"
    );
    Scrape::parse(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_by_name_and_labels() {
        let scrape = Scrape::parse(
            "# HELP x_total things\n# TYPE x_total counter\n\
             x_total{a=\"1\",b=\"two\"} 3\nx_total{a=\"2\",b=\"two\"} 4\ny 0.5\n",
        );
        assert_eq!(scrape.value("x_total", &[("a", "1")]), Some(3.0));
        assert_eq!(
            scrape.value("x_total", &[("b", "two"), ("a", "2")]),
            Some(4.0)
        );
        assert_eq!(scrape.value("x_total", &[("a", "3")]), None);
        assert_eq!(scrape.sum("x_total", &[("b", "two")]), 7.0);
        assert_eq!(scrape.value("y", &[]), Some(0.5));
        assert!(scrape.described("x_total"));
        assert!(!scrape.described("y"));
    }
}
