//! Benchmarks. Each prints a table and writes `target/bench/<name>.json`; the JSON field
//! names are a contract that other tooling reads. Contenders run side by side in the same
//! run, alternating, and results are medians: these machines are noisy.
//!
//! - [`boot`]: a microVM's first exec against bare QEMU.
//! - [`warmup`]: OCI image to ext4 against `umoci unpack` + `mkfs.ext4 -d`.
//! - [`node`]: the node agent: pool and cold creates, clones, idle memory, destroys.
//! - [`api`]: the public API through the gateway and scheduler: creates at c1/c20, exec, overhead.
//! - [`up`]: `nanobox up` to ready, and the seed's Quick Start over REST on a warm cache.

use std::path::Path;

use serde_json::json;

mod api;
mod boot;
mod node;
mod up;
mod warmup;

pub use api::api;
pub use boot::boot;
pub use node::node;
pub use up::up;
pub use warmup::warmup;

pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    // Nearest-rank percentile.
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub(crate) fn host_info() -> serde_json::Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu_model": model })
}

pub(crate) fn write_result(name: &str, value: &serde_json::Value) -> anyhow::Result<()> {
    let dir = Path::new("target/bench");
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// The smallest and largest sample.
pub(crate) fn min_max(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
