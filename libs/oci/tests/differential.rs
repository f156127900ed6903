//! Differential test of layer application against `umoci unpack`: a generated image of
//! edge-case layers (tar flavours, whiteouts, opaque markers, links, modes, owners,
//! xattrs, long names, type changes across layers, seeded random layers) is unpacked by
//! both, and the trees are compared: types, modes, owners, sizes, content hashes, link
//! targets, xattrs (but `security.selinux`), device numbers, hardlink groups and the
//! mtimes of non-directories (directory mtimes are not promised by either tool).
//!
//! Every difference must be listed in [`KNOWN`] with the reason NanoBox is right, or
//! with "NanoBox bug, to fix"; an unlisted difference fails the test, and so does a
//! listed one that no longer occurs (the table stays true).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod differential {
    pub mod generator;
    pub mod tarball;
}

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::{
    hardlink_groups, sha256_hex, snapshot, umoci_unpack, write_oci_layout, LayerBlob, Sandbox,
};
use differential::generator::{capability, layers, Codec, GenLayer};
use nanobox_oci::{ApplyOptions, Compression, LayerApplier};

const SEED: u64 = 0x6e61_6e6f_626f_7821;
const RANDOM_LAYERS: usize = 28;

/// A difference both tools are known to produce, and why it is accepted.
struct Known {
    /// A path, or a prefix ending in `*`.
    path: &'static str,
    /// The compared field ("presence", "kind", "mode", ...).
    field: &'static str,
    /// The spec paragraph that makes NanoBox right, or "NanoBox bug, to fix: ...".
    why: &'static str,
}

/// Empty: the two differences this test found (an empty-valued PAX xattr record, and
/// `trusted.overlay.*` from a layer) were NanoBox bugs and are fixed.
const KNOWN: &[Known] = &[];

/// What is compared of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: usize,
    sha256: String,
    link: Option<String>,
    rdev: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
    nlink: u64,
    mtime: Option<i64>,
    group: Vec<String>,
}

fn records(root: &Path) -> BTreeMap<String, Rec> {
    let groups = hardlink_groups(root);
    snapshot(root, &[])
        .into_iter()
        .map(|(path, node)| {
            let mut xattrs = node.xattrs;
            xattrs.remove("security.selinux");
            let group = groups
                .iter()
                .find(|g| g.contains(&path))
                .cloned()
                .unwrap_or_default();
            let rec = Rec {
                kind: node.kind,
                mode: node.mode,
                uid: node.uid,
                gid: node.gid,
                size: node.content.len(),
                sha256: sha256_hex(&node.content),
                link: node.link.map(|l| l.to_string_lossy().into_owned()),
                rdev: node.rdev,
                xattrs,
                nlink: node.nlink,
                mtime: node.mtime,
                group,
            };
            (path, rec)
        })
        .collect()
}

/// One field that differs at one path.
#[derive(Debug)]
struct Diff {
    path: String,
    field: &'static str,
    ours: String,
    theirs: String,
}

fn compare(ours: &BTreeMap<String, Rec>, theirs: &BTreeMap<String, Rec>) -> Vec<Diff> {
    let mut diffs = Vec::new();
    let mut paths: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
    paths.sort();
    paths.dedup();
    for path in paths {
        let (a, b) = match (ours.get(path), theirs.get(path)) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => {
                let show = |r: Option<&Rec>| r.map_or("absent".to_owned(), |r| r.kind.to_owned());
                diffs.push(Diff {
                    path: path.clone(),
                    field: "presence",
                    ours: show(a),
                    theirs: show(b),
                });
                continue;
            }
        };
        let mut field = |name: &'static str, x: String, y: String| {
            if x != y {
                diffs.push(Diff {
                    path: path.clone(),
                    field: name,
                    ours: x,
                    theirs: y,
                });
            }
        };
        field("kind", a.kind.into(), b.kind.into());
        field("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
        field(
            "owner",
            format!("{}:{}", a.uid, a.gid),
            format!("{}:{}", b.uid, b.gid),
        );
        field("size", a.size.to_string(), b.size.to_string());
        field("sha256", a.sha256.clone(), b.sha256.clone());
        field("link", format!("{:?}", a.link), format!("{:?}", b.link));
        field("rdev", a.rdev.to_string(), b.rdev.to_string());
        field(
            "xattrs",
            format!("{:?}", a.xattrs),
            format!("{:?}", b.xattrs),
        );
        field("nlink", a.nlink.to_string(), b.nlink.to_string());
        field("mtime", format!("{:?}", a.mtime), format!("{:?}", b.mtime));
        field("group", format!("{:?}", a.group), format!("{:?}", b.group));
    }
    diffs
}

fn known_for(diff: &Diff) -> Option<usize> {
    KNOWN.iter().position(|k| {
        let path = match k.path.strip_suffix('*') {
            Some(prefix) => diff.path.starts_with(prefix),
            None => diff.path == k.path,
        };
        path && k.field == diff.field
    })
}

fn blob(layer: &GenLayer, codec: Codec) -> LayerBlob {
    let diff = layer.tar.clone();
    let (blob, media_type) = match codec {
        Codec::Plain => (diff.clone(), "application/vnd.oci.image.layer.v1.tar"),
        Codec::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&diff).unwrap();
            (
                enc.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Codec::Zstd => (
            zstd::encode_all(&diff[..], 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    LayerBlob {
        blob,
        media_type,
        diff,
    }
}

#[test]
fn nanobox_equals_umoci_on_generated_edge_cases() {
    let started = Instant::now();
    let generated = layers(SEED, RANDOM_LAYERS);
    assert!(generated.len() >= 30, "{} layers", generated.len());
    let blobs: Vec<LayerBlob> = generated.iter().map(|l| blob(l, l.codec)).collect();
    // umoci 0.4.7 knows no zstd layers: it gets the same tar gzipped (same diff_id).
    let umoci_blobs: Vec<LayerBlob> = generated
        .iter()
        .map(|l| {
            blob(
                l,
                if l.codec == Codec::Zstd {
                    Codec::Gzip
                } else {
                    l.codec
                },
            )
        })
        .collect();
    // The generator is deterministic: the same seed gives the same bytes.
    let again = layers(SEED, RANDOM_LAYERS);
    assert!(generated.iter().zip(&again).all(|(a, b)| a.tar == b.tar));

    let sb = Sandbox::new();
    let layout = sb.scratch.join("layout");
    write_oci_layout(&layout, "diff", &umoci_blobs);
    let bundle = sb.scratch.join("bundle");
    umoci_unpack(&layout, "diff", &bundle);

    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    for (layer, blob) in generated.iter().zip(&blobs) {
        let compression = Compression::from_media_type(blob.media_type).unwrap();
        applier
            .apply(std::io::Cursor::new(blob.blob.clone()), compression)
            .unwrap_or_else(|e| panic!("layer {}: {e}", layer.name));
    }
    sb.assert_outside_untouched();

    let ours = records(&sb.root);
    let theirs = records(&bundle.join("rootfs"));
    let diffs = compare(&ours, &theirs);
    let mut unexplained = Vec::new();
    let mut used = vec![false; KNOWN.len()];
    for diff in &diffs {
        match known_for(diff) {
            Some(i) => {
                used[i] = true;
                println!(
                    "known: {} {}: ours {} umoci {} ({})",
                    diff.path, diff.field, diff.ours, diff.theirs, KNOWN[i].why
                );
            }
            None => unexplained.push(diff),
        }
    }
    let entries: usize = generated.iter().map(|l| l.entries).sum();
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for layer in &generated {
        for (kind, n) in &layer.ops {
            *ops.entry(kind).or_default() += n;
        }
    }
    println!("random operations: {ops:?}");
    for kind in [
        "file", "dir", "symlink", "hardlink", "fifo", "whiteout", "opaque",
    ] {
        assert!(
            ops.get(kind).copied().unwrap_or(0) >= 3,
            "few {kind}: {ops:?}"
        );
    }
    println!(
        "{} layers, {entries} entries, {} paths, {} differences ({} unexplained), {:?}",
        generated.len(),
        ours.len(),
        diffs.len(),
        unexplained.len(),
        started.elapsed()
    );
    let report: Vec<String> = unexplained
        .iter()
        .map(|d| format!("{} {}: ours {} umoci {}", d.path, d.field, d.ours, d.theirs))
        .collect();
    assert!(
        unexplained.is_empty(),
        "differences from umoci not in KNOWN:\n{}",
        report.join("\n")
    );
    let stale: Vec<&str> = KNOWN
        .iter()
        .zip(&used)
        .filter(|(_, used)| !**used)
        .map(|(k, _)| k.path)
        .collect();
    assert!(
        stale.is_empty(),
        "KNOWN entries that no longer differ: {stale:?}"
    );

    // The rules really ran (trees equal to umoci's could still be wrong in both).
    let has = |p: &str| ours.contains_key(p);
    let content = |p: &str| ours[p].sha256.clone();
    assert_eq!(content("dup/x"), sha256_hex(b"second wins"));
    assert_eq!(ours["dup/y"].kind, "symlink");
    assert_eq!(content("dup/z"), sha256_hex(b"then a file"));
    assert!(!has("dup/z/child"));
    assert!(!has("wh/file") && !has("wh/dir") && !has("wh/sym") && has("wh"));
    assert!(!has("chain/b") && has("chain/a"));
    assert!(!has("opq/a") && !has("opq/link_out") && has("opq/new") && has("opq/sub/c"));
    assert!(has("opq2/new") && !has("opq2/a"));
    assert_eq!(content("wr/a"), sha256_hex(b"upper a"));
    assert_eq!(content("wr/b"), sha256_hex(b"upper b"));
    assert!(has("wr/d/upper") && !has("wr/d/lower"));
    assert!(has("wr/e/upper") && !has("wr/e/lower"));
    assert_eq!(ours["tc/f2d"].kind, "symlink");
    assert_eq!(ours["tc/d2s"].kind, "dir");
    assert_eq!(ours["tc/s2f"].kind, "fifo");
    assert_eq!(ours["tc/d2f"].kind, "file");
    assert_eq!(ours["tc/dev2dir"].kind, "dir");
    assert_eq!(ours["priv"].kind, "file");
    assert!(!has("usr/lib/x") && has("usr/lib/y"));
    assert_eq!(ours["lib"].kind, "symlink");
    assert!(has("usr/bin/tool"));
    assert_eq!(ours["merged"].mode, 0o2755);
    assert_eq!((ours["merged"].uid, ours["merged"].gid), (0, 100_000));
    assert!(ours["merged"].xattrs.is_empty());
    assert!(has("merged/lower") && has("merged/upper"));
    assert_eq!(ours["usr/bin/ping"].mode, 0o4711);
    assert_eq!(
        ours["usr/bin/ping"].xattrs.get("security.capability"),
        Some(&capability())
    );
    // The group lost hl/g (whiteout), hl/h (relinked), hl/sub/i (opaque) and hl/f
    // (replaced): hl/k, linked in a later layer, keeps the old inode with hl/replaced.
    assert_eq!(content("hl/k"), sha256_hex(b"group of four"));
    assert_eq!(
        ours["hl/k"].group,
        ["hl/k", "hl/replaced"].map(String::from).to_vec()
    );
    assert_eq!(ours["hl/k"].nlink, 2);
    assert!(!has("hl/g") && !has("hl/sub/i"));
    assert_eq!(
        ours["hl/h"].group,
        ["hl/h", "sizes/s0"].map(String::from).to_vec()
    );
    assert_eq!(ours["hl/to_symlink"].kind, "symlink");
    assert_eq!(ours["hl/to_fifo"].kind, "fifo");
    assert_eq!(ours["owners/u4294967294"].uid, 4_294_967_294);
    assert_eq!(ours["ro"].mode, 0o500);
    assert!(has("ro/added"));
    assert!(has("names/.whatever") && has("names/.wh") && has("names/dotslash"));
    assert!(has("names/absolute") && has("implicit/a/b/c/file"));
    assert!(has("usr/missing/file") && !has("opt2/a") && has("opt2/b"));
    assert!(!has("lib2") && has("usr/lib/libfoo.so"));
    assert_eq!(ours["modes/full"].mode, 0o755);
    assert_eq!(ours["times/negative"].mtime, Some(-2));
    assert_eq!(ours["v7/file"].kind, "file");
    assert!(ours.keys().any(|p| p.starts_with("rnd/")));
}
