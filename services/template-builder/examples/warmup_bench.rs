//! The whole warmup through the template-builder's gRPC API, for `cargo xtask bench
//! warmup`: the Debian + Node.js test image in a local registry, a fresh builder (new
//! database, empty layer cache, empty object store) per round, timed from the `Warmup`
//! call until `Status` says READY. Prints the seconds of each round as a JSON array.
//!
//! Usage: `warmup_bench <template-builder binary> <init> <rounds>`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nanobox_proto::v1::templates_client::TemplatesClient;
use nanobox_proto::v1::{self, TemplateState};
use nanobox_testkit::images::{debian_node_layout, DEBIAN_NODE_TAG};
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::registry::{PushFormat, Registry};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, builder, init, rounds] = args.as_slice() else {
        panic!("usage: warmup_bench <template-builder binary> <init> <rounds>");
    };
    let rounds: usize = rounds.parse().expect("rounds");
    let pg = Postgres::start().await;
    let registry = Registry::start();
    registry.push(
        &debian_node_layout(),
        DEBIAN_NODE_TAG,
        "library/node",
        "22-bookworm",
        PushFormat::Oci,
    );
    let image = format!("{}/library/node:22-bookworm", registry.host);
    let mut samples = Vec::new();
    for round in 0..rounds {
        let db = pg.create_database().await;
        let dir = tempfile::tempdir_in("target").expect("tempdir");
        // The builder reads nanobox.toml like every service; no API key, so the client
        // needs none (the builder warns that the API is open, which is fine on loopback).
        let config = dir.path().join("nanobox.toml");
        std::fs::write(
            &config,
            format!(
                "[builder]\nlisten_addr = \"127.0.0.1:0\"\nwork_dir = {work:?}\n\n\
                 [oci]\ninit_binary = {init:?}\nplain_http_registries = [{registry:?}]\n\n\
                 [database]\nurl = {db:?}\n\n\
                 [object_store]\nlocation = {objects:?}\n",
                work = std::path::absolute(dir.path().join("work"))
                    .unwrap()
                    .display()
                    .to_string(),
                init = std::path::absolute(init).unwrap().display().to_string(),
                registry = registry.host,
                db = format!(
                    "host={} user=postgres dbname={}",
                    pg.socket_dir().display(),
                    db.get_dbname().unwrap()
                ),
                objects = format!(
                    "file://{}",
                    std::path::absolute(dir.path().join("objects"))
                        .unwrap()
                        .display()
                ),
            ),
        )
        .expect("writing nanobox.toml");
        let mut child = Command::new(builder)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .spawn()
            .expect("template-builder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_owned();
        let mut client = TemplatesClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let started = Instant::now();
        client
            .warmup(v1::WarmupRequest {
                name: "node".into(),
                image: image.clone(),
                platform: String::new(),
            })
            .await
            .unwrap();
        loop {
            let task = client
                .status(v1::GetTemplateStatusRequest {
                    name: "node".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .task
                .unwrap();
            match task.state() {
                TemplateState::Ready => break,
                TemplateState::Failed => panic!("warmup failed: {}", task.message),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            assert!(started.elapsed() < Duration::from_secs(900), "warmup hangs");
        }
        samples.push(started.elapsed().as_secs_f64());
        eprintln!("round {round}: {:.2} s", samples[samples.len() - 1]);
        let _ = child.kill();
        let _ = child.wait();
    }
    println!("{}", serde_json::to_string(&samples).unwrap());
}
