//! `cargo xtask bench up`: how long a newcomer waits. `up_ready_s`: from spawning
//! `nanobox up` to its `nanobox: ready` line, with PostgreSQL already initialised (a first
//! run, not counted, initialises it and fills the caches). `quickstart_s`: the seed's Quick
//! Start over REST on that warm cache: warmup of an image whose layers are cached, create
//! (a cold boot: the stack has no pool), exec `node -e`. Five rounds; medians.

use serde_json::json;

use super::{median, min_max, round3, write_result};
use crate::quickstart;
use crate::setup::{self, Guest};

const ROUNDS: usize = 5;

pub fn up(guest: &Guest) -> anyhow::Result<()> {
    quickstart::build_release()?;
    let (registry, image) = quickstart::serve_image()?;
    let data_dir = quickstart::data_dir("bench-up");
    setup::step("a first round, not counted (initialises PostgreSQL, fills the caches)");
    {
        let mut up = quickstart::Up::start(guest, &data_dir, &registry.host)?;
        quickstart::run(&up, &image, false)?;
        up.stop()?;
    }
    let (mut ready, mut total, mut warmup, mut create, mut exec) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        setup::step(&format!("round {round} of {ROUNDS}"));
        let mut up = quickstart::Up::start(guest, &data_dir, &registry.host)?;
        let t = quickstart::run(&up, &image, false)?;
        up.stop()?;
        ready.push(up.ready_after.as_secs_f64());
        warmup.push(t.warmup.as_secs_f64());
        create.push(t.create.as_secs_f64());
        exec.push(t.exec.as_secs_f64());
        total.push((t.warmup + t.create + t.exec).as_secs_f64());
        eprintln!(
            "round {round}: ready {:.2} s, quickstart {:.2} s",
            ready[round - 1],
            total[round - 1]
        );
    }
    let result = json!({
        "up_ready_s_median": round3(median(&ready)),
        "quickstart_s_median": round3(median(&total)),
        "quickstart_warmup_s_median": round3(median(&warmup)),
        "quickstart_create_s_median": round3(median(&create)),
        "quickstart_exec_s_median": round3(median(&exec)),
        "samples": {
            "up_ready_s": ready,
            "quickstart_s": total,
            "warmup_s": warmup,
            "create_s": create,
            "exec_s": exec,
        },
        "rounds": ROUNDS,
        "host": super::host_info(),
    });
    println!();
    println!("up benchmark ({ROUNDS} rounds, medians)");
    println!(
        "{:<30} {:>10} {:>10} {:>10}",
        "metric", "median", "min", "max"
    );
    for (name, values) in [
        ("up_ready_s", &ready),
        ("quickstart_s", &total),
        ("  warmup (cached image)", &warmup),
        ("  create (cold boot)", &create),
        ("  exec node -e", &exec),
    ] {
        let (min, max) = min_max(values);
        println!(
            "{name:<30} {:>10.3} {min:>10.3} {max:>10.3}",
            median(values)
        );
    }
    write_result("up", &result)
}
