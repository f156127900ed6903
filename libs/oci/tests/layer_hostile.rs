//! Hostile layers: each must leave the host outside the staging root untouched, and
//! those that are refused must name the offending entry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::{assert_names, node, Layer, Sandbox};
use nanobox_oci::{ApplyOptions, Compression, LayerApplier, LimitKind, Limits, OciError};
use tar::EntryType;

#[test]
fn dotdot_entry_is_refused() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .raw(EntryType::Regular, b"../outside/secret", b"", b"pwned")
        .tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert!(matches!(err, OciError::UnsafePath { .. }), "{err:?}");
    assert_names(&err, "../outside/secret");
    sb.assert_outside_untouched();
}

#[test]
fn dotdot_in_the_middle_is_refused() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .raw(EntryType::Regular, b"a/../../escape", b"", b"pwned")
        .tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert_names(&err, "a/../../escape");
    assert!(!sb.tmp.path().join("escape").exists());
    sb.assert_outside_untouched();
}

#[test]
fn absolute_entry_lands_inside_the_root() {
    let sb = Sandbox::new();
    let target = format!("{}/secret", sb.outside_abs());
    let layer = Layer::new()
        .raw(EntryType::Regular, target.as_bytes(), b"", b"pwned")
        .tar();
    sb.apply(vec![layer]).unwrap();
    sb.assert_outside_untouched();
    assert_eq!(
        fs::read(sb.root.join(target.trim_start_matches('/'))).unwrap(),
        b"pwned"
    );
}

/// Layer 1 plants `evil -> <outside>`; layer 2 writes `evil/secret` and `evil/new`.
fn symlinked_parent_layers(sb: &Sandbox) -> Vec<Vec<u8>> {
    vec![
        Layer::new().symlink("evil", &sb.outside_abs()).tar(),
        Layer::new()
            .file("evil/secret", b"pwned", 0o644)
            .file("evil/new", b"pwned", 0o644)
            .tar(),
    ]
}

#[test]
fn symlinked_parent_from_an_earlier_layer_is_resolved_inside_the_root() {
    let sb = Sandbox::new();
    sb.apply(symlinked_parent_layers(&sb)).unwrap();
    sb.assert_outside_untouched();
    let inside = sb.root.join(sb.outside_abs().trim_start_matches('/'));
    assert_eq!(fs::read(inside.join("secret")).unwrap(), b"pwned");
    assert_eq!(node(&sb.at("evil")).kind, "symlink");
}

#[test]
fn symlinked_parent_is_refused_when_following_is_off() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        follow_parent_symlinks: false,
        ..ApplyOptions::default()
    };
    let err = sb
        .apply_with(symlinked_parent_layers(&sb), opts)
        .unwrap_err();
    assert!(matches!(err, OciError::SymlinkParent { .. }), "{err:?}");
    assert_names(&err, "evil/secret");
    sb.assert_outside_untouched();
}

#[test]
fn relative_symlink_climbing_out_is_clamped_at_the_root() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .dir("a", 0o755)
        .symlink("a/up", "../../../../../outside")
        .file("a/up/secret", b"pwned", 0o644)
        .tar();
    sb.apply(vec![layer]).unwrap();
    sb.assert_outside_untouched();
    assert_eq!(fs::read(sb.at("outside/secret")).unwrap(), b"pwned");
}

#[test]
fn symlink_loop_in_a_parent_is_refused() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", b"x", 0o644)
        .tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert!(matches!(err, OciError::SymlinkLoop { .. }), "{err:?}");
    assert_names(&err, "a/x");
    sb.assert_outside_untouched();
}

#[test]
fn file_over_a_symlink_replaces_the_symlink() {
    let sb = Sandbox::new();
    let secret = format!("{}/secret", sb.outside_abs());
    let l1 = Layer::new().symlink("link", &secret).tar();
    let l2 = Layer::new()
        .file_owned("link", b"pwned", 0o4777, 1234, 1234)
        .tar();
    sb.apply(vec![l1, l2]).unwrap();
    sb.assert_outside_untouched();
    assert_eq!(node(&sb.at("link")).kind, "file");
}

#[test]
fn directory_over_a_symlink_does_not_chmod_the_target() {
    let sb = Sandbox::new();
    let l1 = Layer::new().symlink("d", &sb.outside_abs()).tar();
    let l2 = Layer::new().dir_owned("d", 0o777, 1234, 1234).tar();
    sb.apply(vec![l1, l2]).unwrap();
    sb.assert_outside_untouched();
    assert_eq!(node(&sb.at("d")).kind, "dir");
}

#[test]
fn device_and_fifo_over_a_symlink_stay_inside() {
    let sb = Sandbox::new();
    let secret = format!("{}/secret", sb.outside_abs());
    let l1 = Layer::new()
        .symlink("dev", &secret)
        .symlink("pipe", &secret)
        .tar();
    let l2 = Layer::new()
        .device("dev", EntryType::Char, 1, 3)
        .fifo("pipe", 0o666)
        .tar();
    sb.apply(vec![l1, l2]).unwrap();
    sb.assert_outside_untouched();
    assert_eq!(node(&sb.at("dev")).kind, "char");
}

#[test]
fn deferred_directory_metadata_skips_a_directory_later_replaced_by_a_symlink() {
    let sb = Sandbox::new();
    // `d/sub` is declared (its mode deferred to the end of the layer), then `d` becomes a
    // symlink to the host: applying the deferred mode must not follow it.
    let layer = Layer::new()
        .dir("d", 0o755)
        .dir_owned("d/sub", 0o777, 1234, 1234)
        .symlink("d", &sb.outside_abs())
        .tar();
    sb.apply(vec![layer]).unwrap();
    sb.assert_outside_untouched();
}

#[test]
fn hardlink_with_dotdot_target_is_refused() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .raw(EntryType::Link, b"stolen", b"../outside/secret", b"")
        .tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert!(matches!(err, OciError::BadHardlink { .. }), "{err:?}");
    assert_names(&err, "stolen");
    sb.assert_outside_untouched();
    assert!(!sb.at("stolen").exists());
}

#[test]
fn hardlink_to_an_absolute_host_path_resolves_inside_the_root() {
    let sb = Sandbox::new();
    let secret = format!("{}/secret", sb.outside_abs());
    let layer = Layer::new()
        .raw(EntryType::Link, b"stolen", secret.as_bytes(), b"")
        .tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert!(matches!(err, OciError::BadHardlink { .. }), "{err:?}");
    assert_names(&err, "stolen");
    sb.assert_outside_untouched();
    assert_eq!(fs::metadata(sb.outside.join("secret")).unwrap().nlink(), 1);
}

#[test]
fn hardlink_through_a_symlinked_parent_stays_inside() {
    let sb = Sandbox::new();
    let l1 = Layer::new().symlink("evil", &sb.outside_abs()).tar();
    let l2 = Layer::new().hardlink("stolen", "evil/secret").tar();
    let err = sb.apply(vec![l1, l2]).unwrap_err();
    assert_names(&err, "stolen");
    sb.assert_outside_untouched();
    assert_eq!(fs::metadata(sb.outside.join("secret")).unwrap().nlink(), 1);
}

#[test]
fn hardlink_to_an_escaping_symlink_links_the_symlink_itself() {
    let sb = Sandbox::new();
    let secret = format!("{}/secret", sb.outside_abs());
    let l1 = Layer::new()
        .symlink("esc", &secret)
        .hardlink("h", "esc")
        .tar();
    // Writing to the hardlink later replaces it; it never writes through it.
    let l2 = Layer::new().file("h", b"pwned", 0o644).tar();
    sb.apply(vec![l1]).unwrap();
    assert_eq!(node(&sb.at("h")).kind, "symlink");
    assert_eq!(
        fs::symlink_metadata(sb.at("h")).unwrap().ino(),
        fs::symlink_metadata(sb.at("esc")).unwrap().ino()
    );
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    applier
        .apply(std::io::Cursor::new(l2), Compression::None)
        .unwrap();
    sb.assert_outside_untouched();
    assert_eq!(fs::metadata(sb.outside.join("secret")).unwrap().nlink(), 1);
}

#[test]
fn whiteout_of_dotdot_is_refused() {
    let sb = Sandbox::new();
    for name in ["d/.wh..", "d/.wh.", "d/.wh..."] {
        let layer = Layer::new().dir("d", 0o755).whiteout(name).tar();
        let err = sb.apply(vec![layer]).unwrap_err();
        assert!(matches!(err, OciError::BadWhiteout { .. }), "{err:?}");
        assert_names(&err, name);
    }
    sb.assert_outside_untouched();
    assert!(sb.root.exists());
}

#[test]
fn whiteout_in_a_dotdot_parent_is_refused() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .raw(EntryType::Regular, b"../outside/.wh.secret", b"", b"")
        .tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert_names(&err, "../outside/.wh.secret");
    sb.assert_outside_untouched();
}

#[test]
fn whiteouts_through_a_symlinked_parent_stay_inside() {
    let sb = Sandbox::new();
    let l1 = Layer::new().symlink("evil", &sb.outside_abs()).tar();
    let l2 = Layer::new()
        .whiteout("evil/.wh.secret")
        .whiteout("evil/.wh.sub")
        .whiteout("evil/.wh..wh..opq")
        .tar();
    sb.apply(vec![l1, l2]).unwrap();
    sb.assert_outside_untouched();
}

#[test]
fn file_data_budget_is_enforced_across_layers() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        limits: Limits {
            max_data_bytes: 1500,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let l1 = Layer::new().file("a", &[1; 1000], 0o644).tar();
    let l2 = Layer::new().file("b", &[2; 1000], 0o644).tar();
    let err = sb.apply_with(vec![l1, l2], opts).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::DataSize,
                value: 2000,
                limit: 1500,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "b");
    sb.assert_outside_untouched();
}

#[test]
fn entry_count_bomb_is_refused() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        limits: Limits {
            max_entries: 100,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let mut layer = Layer::new();
    for i in 0..200 {
        layer = layer.file(&format!("f{i}"), b"", 0o644);
    }
    let err = sb.apply_with(vec![layer.tar()], opts).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::EntryCount,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "f100");
    sb.assert_outside_untouched();
}

#[test]
fn path_length_bomb_is_refused() {
    let sb = Sandbox::new();
    let long = "a/".repeat(3000) + "x";
    let err = sb
        .apply(vec![Layer::new().file(&long, b"x", 0o644).tar()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::PathLength,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, &long);
    assert!(!sb.at("a").exists());
}

#[test]
fn symlink_target_length_is_limited() {
    let sb = Sandbox::new();
    let target = "t".repeat(5000);
    let err = sb
        .apply(vec![Layer::new().symlink("s", &target).tar()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::PathLength,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "s");
}

#[test]
fn a_thousandfold_compressible_file_is_legal_and_costs_no_data() {
    // 64 MiB of zeros compress to a few kilobytes: a ratio limit refused this; the
    // budgets count what it costs, and zeros cost nothing but decompression.
    let sb = Sandbox::new();
    let blob = Layer::new()
        .file("small", b"ok", 0o644)
        .file("zeros", &vec![0; 64 << 20], 0o644)
        .zstd();
    assert!(blob.len() < 64 << 10);
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    let stats = applier
        .apply(std::io::Cursor::new(blob), Compression::Zstd)
        .unwrap();
    assert_eq!(
        stats.file_bytes, 2,
        "only the two bytes of data are written"
    );
    let meta = std::fs::metadata(sb.at("zeros")).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 <= 8192, "{} blocks", meta.blocks());
}

#[test]
fn decompressed_stream_budget_is_enforced() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        limits: Limits {
            max_stream_bytes: 1 << 20,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let blob = Layer::new().file("big", &vec![7; 2 << 20], 0o644).gzip();
    let mut applier = LayerApplier::new(&sb.root, opts).unwrap();
    let err = applier
        .apply(std::io::Cursor::new(blob), Compression::Gzip)
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::StreamSize,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "big");
}

#[test]
fn entry_replacing_the_root_is_refused() {
    let sb = Sandbox::new();
    let layer = Layer::new().raw(EntryType::Symlink, b"./", b"/", b"").tar();
    let err = sb.apply(vec![layer]).unwrap_err();
    assert!(matches!(err, OciError::UnsafePath { .. }), "{err:?}");
    assert_names(&err, "./");
    assert!(fs::symlink_metadata(&sb.root).unwrap().is_dir());
}

#[test]
fn huge_pax_header_is_refused_before_it_is_buffered() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        limits: Limits {
            max_header_bytes: 1 << 20,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let big = vec![b'x'; 8 << 20];
    let layer = Layer::new()
        .file("before", b"ok", 0o644)
        .pax(&[("SCHILY.xattr.user.bomb", &big)])
        .file("bomb", b"x", 0o644)
        .tar();
    let err = sb.apply_with(vec![layer], opts).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::HeaderSize,
                ..
            }
        ),
        "{err:?}"
    );
    // The bomb's own name is inside the bomb: the error names the entry before it.
    assert_names(&err, "before");
    assert!(!sb.at("bomb").exists());
}

#[test]
fn huge_gnu_long_name_is_refused() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        limits: Limits {
            max_header_bytes: 1 << 20,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let long = "n/".repeat(2 << 20);
    let err = sb
        .apply_with(vec![Layer::new().file(&long, b"x", 0o644).tar()], opts)
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                kind: LimitKind::HeaderSize,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn file_data_does_not_count_as_header_bytes() {
    let sb = Sandbox::new();
    let opts = ApplyOptions {
        limits: Limits {
            max_header_bytes: 64 << 10,
            ..Limits::default()
        },
        ..ApplyOptions::default()
    };
    let layer = Layer::new()
        .file("a", &vec![1; 4 << 20], 0o644)
        .file("b", &vec![2; 4 << 20], 0o644)
        .tar();
    sb.apply_with(vec![layer], opts).unwrap();
    assert_eq!(fs::metadata(sb.at("b")).unwrap().len(), 4 << 20);
}
