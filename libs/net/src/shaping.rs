//! Rate limits with `tc` for VMMs that have no limiter of their own (QEMU).
//!
//! A token bucket (`tbf`) on the egress of each of the sandbox namespace's two links:
//! the TAP (traffic towards the guest, its downloads) and the uplink veth (traffic from
//! the guest after NAT, its uploads). Both are real queues rather than an ingress
//! policer, so TCP sees delay instead of drops and settles at the configured rate; both
//! live in the sandbox's namespace and vanish with it.
//!
//! `tbf` counts whole frames, headers included, as Firecracker's limiter does: a bulk
//! TCP transfer shows about 96% of the rate as payload.

use std::path::Path;

use nanobox_vmm::RateLimit;

use crate::sandbox::{TAP_NAME, UPLINK_NAME};
use crate::NetError;

/// The smallest bucket that still passes a full-size frame (two, for slack): with less,
/// `tbf` would drop every packet.
const MIN_BURST: u64 = 2 * 1514;

/// How long a packet may wait in the bucket's queue; sets the queue length.
const LATENCY: &str = "100ms";

/// Shapes both directions of the sandbox in namespace `ns` to `limit`.
pub(crate) async fn apply(ns: &Path, limit: RateLimit) -> Result<(), NetError> {
    for dev in [TAP_NAME, UPLINK_NAME] {
        let args = tbf_args(dev, limit);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::command::run(Some(ns), "tc", &args, None).await?;
    }
    Ok(())
}

fn tbf_args(dev: &str, limit: RateLimit) -> Vec<String> {
    // tc reads "bps" as bytes per second; bits are spelled out to leave no doubt.
    let bits = limit.rate_bytes_per_sec.saturating_mul(8);
    let burst = limit.burst_bytes.max(MIN_BURST);
    [
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{bits}bit"),
        "burst",
        &burst.to_string(),
        "latency",
        LATENCY,
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_bits_and_bursts_fit_a_frame() {
        let args = tbf_args(
            "tap0",
            RateLimit {
                rate_bytes_per_sec: 1000,
                burst_bytes: 10,
            },
        );
        assert_eq!(
            args.join(" "),
            "qdisc replace dev tap0 root tbf rate 8000bit burst 3028 latency 100ms"
        );
    }
}
