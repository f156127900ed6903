//! Copy-on-write clone creation times, for `docs/benchmarks.md` and the node benchmark.
//!
//! `cow_bench <template> <dir> [rounds]`: clone `<template>` into `<dir>` with each method
//! `rounds` times (default 5, methods alternating within a round) with
//! [`nanobox_node_storage::measure_cow`] and print one JSON object: per method the
//! samples and median in ms, or why the method is not possible in `<dir>`.

use std::path::PathBuf;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(template), Some(dir)) = (args.first(), args.get(1)) else {
        return Err("usage: cow_bench <template> <dir> [rounds]".into());
    };
    let rounds = match args.get(2) {
        Some(n) => n.parse()?,
        None => 5,
    };
    let timings =
        nanobox_node_storage::measure_cow(&PathBuf::from(template), &PathBuf::from(dir), rounds)?;
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let mut out = serde_json::Map::new();
    for t in timings {
        let value = match t.unsupported {
            Some(reason) => serde_json::json!({ "unsupported": reason }),
            None => serde_json::json!({
                "median_ms": t.median.map(ms),
                "samples_ms": t.samples.into_iter().map(ms).collect::<Vec<_>>(),
            }),
        };
        out.insert(t.method.as_str().to_owned(), value);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
