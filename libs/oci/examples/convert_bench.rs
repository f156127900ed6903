//! Measurements for `cargo xtask bench warmup` that need the library in a release build.
//!
//! `convert_bench layout`: print the path of the Debian + Node.js test image layout
//! (building and caching it first if needed, see `nanobox_testkit::images`);
//! `convert_bench large-layout`: the same with a layer of generated files, over 2 GB.
//!
//! `convert_bench convert <layout> <tag> <init> <out>`: convert the image to an ext4 at
//! `<out>` with [`nanobox_oci::convert`] and print JSON: the seconds the call took, when
//! the last layer was applied, and the image's size and inode count (the baseline builds
//! an image of the same geometry). `CONVERT_BENCH_STAGING=disk` (or `memory`) pins where
//! the staging tree goes instead of letting `convert` choose, to measure each alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanobox_oci::{convert, ConvertEvent, ConvertOptions, OciLayout, Platform, Staged, Staging};

type Error = Box<dyn std::error::Error>;

fn usage() -> Error {
    "usage: convert_bench layout | large-layout | convert <layout> <tag> <init> <out>".into()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("layout") => {
            println!(
                "{}",
                nanobox_testkit::images::debian_node_layout().display()
            );
            Ok(())
        }
        Some("large-layout") => {
            println!(
                "{}",
                nanobox_testkit::images::debian_large_layout().display()
            );
            Ok(())
        }
        Some("convert") => {
            let [layout, tag, init, out] = &args[1..] else {
                return Err(usage());
            };
            run(Path::new(layout), tag, init.into(), out.into()).await
        }
        _ => Err(usage()),
    }
}

async fn run(layout: &Path, tag: &str, init: PathBuf, out: PathBuf) -> Result<(), Error> {
    // Reading the layout is part of the conversion a user waits for.
    let started = Instant::now();
    let layout = OciLayout::open(layout)?;
    let image = layout.resolve(Some(tag), &Platform::linux_amd64())?;
    let building: Arc<Mutex<Option<(Duration, Staged)>>> = Arc::default();
    let mark = building.clone();
    let on_event = Arc::new(move |event| {
        if let ConvertEvent::Building { staging } = event {
            if let Ok(mut at) = mark.lock() {
                *at = Some((started.elapsed(), staging));
            }
        }
    });
    let staging = match std::env::var("CONVERT_BENCH_STAGING").as_deref() {
        Ok("disk") => Staging::BesideOutput,
        Ok("memory") => Staging::In("/dev/shm".into()),
        _ => Staging::Auto,
    };
    let options = ConvertOptions {
        staging,
        ..ConvertOptions::default()
    };
    let built = convert(layout, image, init, out, options, on_event).await?;
    let total = started.elapsed().as_secs_f64();
    let building = building.lock().ok().and_then(|at| *at);
    let applied = building.map_or(f64::NAN, |(d, _)| d.as_secs_f64());
    let staged = match building.map(|(_, s)| s) {
        Some(Staged::Memory) => "memory".to_owned(),
        Some(Staged::Hybrid { spilled_files }) => format!("hybrid ({spilled_files} files spilled)"),
        Some(Staged::Disk) => "disk".to_owned(),
        None => "unknown".to_owned(),
    };
    println!(
        "{}",
        serde_json::json!({
            "seconds": total,
            "apply_seconds": applied,
            "staging": staged,
            "size_bytes": built.size_bytes,
            "inodes": built.inodes,
        })
    );
    Ok(())
}
