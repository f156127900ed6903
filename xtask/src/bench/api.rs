//! `cargo xtask bench api`: the public API end to end with release binaries: Postgres, the
//! scheduler, one node agent with a warm pool of 24 real guests, the REST gateway.
//!
//! Fields of `target/bench/api.json` (a contract): `pool_create_ms_p50_c1` (REST creates
//! served by the warm pool, one client), `pool_create_ms_p50_c20` and
//! `pool_create_ms_p99_c20` (3 waves of 20 concurrent creates, the pool full before each),
//! `creates_per_s_c20` (creates of those waves over their wall time), `exec_rtt_ms_p50` and
//! `exec_rtt_ms_p99` (REST exec of `true`, aggregated answer) and `gateway_overhead_ratio`
//! (median REST `GET /api/v1/sandboxes/{id}` over the median direct gRPC `Get` of the same
//! sandbox, alternating).

use std::process::Command;

use anyhow::Context as _;
use serde_json::json;

use super::{median, percentile, round3, write_result};
use crate::setup::{self, Guest};

pub fn api(guest: &Guest) -> anyhow::Result<()> {
    setup::step("building the scheduler, node agent, gateway and api_bench (release)");
    setup::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "nanobox-scheduler-service",
        "--bin",
        "nanobox-scheduler",
        "-p",
        "nanobox-node-agent",
        "--bin",
        "nanobox-node-agent",
        "-p",
        "nanobox-gateway",
        "--bin",
        "nanobox-gateway",
        "--example",
        "api_bench",
    ])?;
    let work = std::env::current_dir()?
        .join("target/bench")
        .join(format!("api-work.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    setup::step("a pool of 24, 20 creates at c1, 100 execs, 200+200 gets, 3 waves of 20 creates");
    let out = Command::new("target/release/examples/api_bench")
        .arg("target/release/nanobox-scheduler")
        .arg("target/release/nanobox-node-agent")
        .arg("target/release/nanobox-gateway")
        .arg(&guest.kernel)
        .arg(&guest.rootfs)
        .arg(&work)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running api_bench");
    let _ = std::fs::remove_dir_all(&work);
    let out = out?;
    anyhow::ensure!(out.status.success(), "api_bench failed");
    let raw: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading api_bench's output")?;
    let samples = |key: &str| -> Vec<f64> {
        raw[key]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let c1 = samples("pool_create_ms_c1");
    let c20 = samples("pool_create_ms_c20");
    let waves = samples("wave_s_c20");
    let exec = samples("exec_rtt_ms");
    let rest_get = samples("rest_get_ms");
    let grpc_get = samples("grpc_get_ms");
    anyhow::ensure!(
        !c1.is_empty()
            && !c20.is_empty()
            && !waves.is_empty()
            && !exec.is_empty()
            && !rest_get.is_empty()
            && !grpc_get.is_empty(),
        "api_bench returned no samples: {raw}"
    );
    let creates_per_s = c20.len() as f64 / waves.iter().sum::<f64>();
    let ratio = median(&rest_get) / median(&grpc_get);
    let result = json!({
        "pool_create_ms_p50_c1": round3(percentile(&c1, 50.0)),
        "pool_create_ms_p50_c20": round3(percentile(&c20, 50.0)),
        "pool_create_ms_p99_c20": round3(percentile(&c20, 99.0)),
        "creates_per_s_c20": round3(creates_per_s),
        "exec_rtt_ms_p50": round3(percentile(&exec, 50.0)),
        "exec_rtt_ms_p99": round3(percentile(&exec, 99.0)),
        "gateway_overhead_ratio": round3(ratio),
        "pool_create_ms_p99_c1": round3(percentile(&c1, 99.0)),
        "rest_get_ms_median": round3(median(&rest_get)),
        "grpc_get_ms_median": round3(median(&grpc_get)),
        "samples": raw,
        "host": super::host_info(),
    });

    println!();
    println!("api benchmark");
    println!("{:<28} {:>12}", "metric", "value");
    let row = |name: &str, v: f64, goal: &str| println!("{name:<28} {v:>12.3}   {goal}");
    row("pool_create_ms_p50_c1", percentile(&c1, 50.0), "");
    row("pool_create_ms_p99_c1", percentile(&c1, 99.0), "");
    row(
        "pool_create_ms_p50_c20",
        percentile(&c20, 50.0),
        "(goal <= 15)",
    );
    row(
        "pool_create_ms_p99_c20",
        percentile(&c20, 99.0),
        "(goal <= 50)",
    );
    row("creates_per_s_c20", creates_per_s, "(goal >= 40)");
    row("exec_rtt_ms_p50", percentile(&exec, 50.0), "");
    row("exec_rtt_ms_p99", percentile(&exec, 99.0), "");
    row("rest_get_ms_median", median(&rest_get), "");
    row("grpc_get_ms_median", median(&grpc_get), "");
    row("gateway_overhead_ratio", ratio, "");
    write_result("api", &result)
}
