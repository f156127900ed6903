//! The layers of the differential image: scripted edge cases (each names the rule it
//! exercises) followed by seeded random layers over a small name pool, whose operations
//! a model of the tree keeps valid (no hardlink to a missing target, no entry under a
//! file) so that both tools must accept every layer.

use std::collections::{BTreeMap, BTreeSet};

use super::tarball::{Flavour, Kind, Meta, Tarball};

/// A small xorshift generator: deterministic, no crate needed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Plain,
    Gzip,
    Zstd,
}

/// One generated layer.
#[derive(Debug)]
pub struct GenLayer {
    pub name: String,
    pub tar: Vec<u8>,
    pub codec: Codec,
    pub entries: usize,
    /// Random operations by kind (empty for scripted layers).
    pub ops: BTreeMap<&'static str, usize>,
}

const SIZES: [usize; 9] = [0, 1, 511, 512, 513, 4096, 65_536, 65_537, 200_003];
const UIDS: [u64; 6] = [0, 1000, 65_534, 100_000, 3_000_000, 4_294_967_294];
const FILE_MODES: [u32; 9] = [
    0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6711, 0o1644, 0o444, 0o000,
];
const DIR_MODES: [u32; 7] = [0o755, 0o700, 0o555, 0o2775, 0o1777, 0o711, 0o3750];
const FLAVOURS: [Flavour; 4] = [Flavour::Gnu, Flavour::Ustar, Flavour::Pax, Flavour::V7];
/// 120 bytes: every path through it needs a long-name extension.
const LONG: &str = "a-component-that-is-long-enough-to-need-a-long-name-extension-in-every-tar-format-there-is-and-then-some-more-0123456789";

/// A layer under construction with a rotating default flavour.
struct L {
    tar: Tarball,
    flavour: Flavour,
}

impl L {
    fn new(flavour: Flavour) -> Self {
        Self {
            tar: Tarball::new(),
            flavour,
        }
    }
    fn e(&mut self, path: &str, kind: Kind, meta: Meta) -> &mut Self {
        self.tar.entry(self.flavour, path, &kind, &meta);
        self
    }
    fn ef(&mut self, flavour: Flavour, path: &str, kind: Kind, meta: Meta) -> &mut Self {
        self.tar.entry(flavour, path, &kind, &meta);
        self
    }
    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.e(path, Kind::Dir, Meta::new(mode))
    }
    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.e(path, Kind::File(data.to_vec()), Meta::new(mode))
    }
    fn sym(&mut self, path: &str, target: &str) -> &mut Self {
        self.e(path, Kind::Symlink(target.into()), Meta::new(0o777))
    }
    fn hard(&mut self, path: &str, target: &str) -> &mut Self {
        self.e(path, Kind::Hardlink(target.into()), Meta::new(0o644))
    }
    fn wh(&mut self, path: &str) -> &mut Self {
        self.e(path, Kind::File(Vec::new()), Meta::new(0o644))
    }
    /// Home directories with their owners.
    fn home(&mut self) -> &mut Self {
        self.e("home", Kind::Dir, Meta::new(0o755))
            .e("home/user", Kind::Dir, Meta::new(0o750).owner(1000, 1000))
            .e(
                "home/user/.profile",
                Kind::File(b"export A=1\n".to_vec()),
                Meta::new(0o600).owner(1000, 1000),
            )
            .e(
                "home/nobody",
                Kind::Dir,
                Meta::new(0o700).owner(65_534, 65_534),
            )
    }
    fn done(self, name: &str, codec: Codec) -> GenLayer {
        GenLayer {
            name: name.into(),
            entries: self.tar.entries,
            tar: self.tar.finish(),
            codec,
            ops: BTreeMap::new(),
        }
    }
}

/// The scripted edge cases, in layer order.
fn scripted(rng: &mut Rng) -> Vec<GenLayer> {
    let cap = capability();
    let mut layers = Vec::new();

    // base: the tree everything later changes.
    let mut l = L::new(Flavour::Gnu);
    l.dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .dir("usr/bin", 0o755)
        .sym("lib", "usr/lib")
        .sym("bin", "/usr/bin")
        .file("usr/lib/libfoo.so", b"libfoo", 0o755)
        .home()
        .e("tmp", Kind::Dir, Meta::new(0o1777))
        .e("srv", Kind::Dir, Meta::new(0o2775).owner(0, 1000))
        .e("ro", Kind::Dir, Meta::new(0o555))
        .file("ro/inside", b"in a read-only dir", 0o444)
        .e("priv", Kind::Dir, Meta::new(0o700).owner(1000, 1000))
        .file("priv/secret", b"secret", 0o600)
        .e("usr/bin/su", Kind::File(b"su".to_vec()), Meta::new(0o4755))
        .e(
            "usr/bin/wall",
            Kind::File(b"wall".to_vec()),
            Meta::new(0o2755).owner(0, 5),
        )
        .e(
            "usr/bin/both",
            Kind::File(b"both".to_vec()),
            Meta::new(0o6755),
        )
        .e(
            "usr/bin/sticky",
            Kind::File(b"st".to_vec()),
            Meta::new(0o1755),
        )
        .e(
            "usr/bin/ping",
            Kind::File(b"ping".to_vec()),
            Meta::new(0o755).xattr("security.capability", &cap),
        );
    for size in SIZES {
        let data = rng.bytes(size);
        l.ef(
            *rng.pick(&FLAVOURS),
            &format!("sizes/s{size}"),
            Kind::File(data),
            Meta::new(0o644).mtime(1_600_000_000 + size as u64),
        );
    }
    for (i, id) in UIDS.iter().enumerate() {
        l.ef(
            FLAVOURS[i % 4],
            &format!("owners/u{id}"),
            Kind::File(format!("owned by {id}").into_bytes()),
            Meta::new(0o640).owner(*id, UIDS[(i + 1) % UIDS.len()]),
        );
    }
    l.e(
        "owners/dir1000",
        Kind::Dir,
        Meta::new(0o750).owner(1000, 1000),
    );
    l.sym("chain/a", "b")
        .sym("chain/b", "c")
        .sym("chain/c", "../sizes/s1")
        .sym("chain/dangling", "/nonexistent/target")
        .sym("chain/todir", "../usr/lib")
        .sym("chain/escape", "../../../../../etc/passwd")
        .sym("chain/self", "self")
        .e(
            "chain/xsym",
            Kind::Symlink("a".into()),
            // No user.* here: Linux refuses them on symlinks, NanoBox skips them and
            // umoci 0.4.7 fails the whole unpack (EPERM), so there is no tree to compare.
            Meta::new(0o777).xattr("trusted.sym", b"t"),
        );
    l.e("dev/fifo", Kind::Fifo, Meta::new(0o600))
        .e("dev/null", Kind::Char(1, 3), Meta::new(0o666))
        .e(
            "dev/tty",
            Kind::Char(5, 0),
            Meta::new(0o620).owner(0, 5).xattr("trusted.dev", b"tty"),
        )
        .e("dev/sda", Kind::Block(8, 0), Meta::new(0o660).owner(0, 6))
        .e("dev/big", Kind::Block(259, 65_536), Meta::new(0o600));
    l.file("hl/f", b"group of four", 0o640)
        .hard("hl/g", "hl/f")
        .hard("hl/h", "hl/g")
        .hard("hl/sub/i", "hl/f")
        .hard("hl/to_symlink", "chain/a")
        .hard("hl/to_fifo", "dev/fifo")
        .hard("hl/to_char", "dev/null")
        .file("hl/replaced", b"old", 0o644)
        .hard("hl/replaced", "hl/f")
        .hard("hl/via_lib", "lib/libfoo.so");
    l.ef(
        Flavour::Gnu,
        &format!("long/gnu/{LONG}"),
        Kind::File(b"gnu long".to_vec()),
        Meta::new(0o644),
    )
    .ef(
        Flavour::Ustar,
        &format!("long/ustar/{}/file", &LONG[..90]),
        Kind::File(b"ustar prefix".to_vec()),
        Meta::new(0o644),
    )
    .ef(
        Flavour::Pax,
        &format!("long/pax/{LONG}/{LONG}/{LONG}"),
        Kind::File(b"pax long".to_vec()),
        Meta::new(0o644),
    )
    .ef(
        Flavour::Gnu,
        &format!("long/gnu/{LONG}2"),
        Kind::Symlink(format!("../../{LONG}/{LONG}")),
        Meta::new(0o777),
    )
    .ef(
        Flavour::Pax,
        "long/paxlink",
        Kind::Symlink(format!("{LONG}/{LONG}/{LONG}")),
        Meta::new(0o777),
    )
    .ef(
        Flavour::Gnu,
        "long/hard_gnu",
        Kind::Hardlink(format!("long/gnu/{LONG}")),
        Meta::new(0o644),
    )
    .ef(
        Flavour::Pax,
        &format!("long/pax/{LONG}/hard"),
        Kind::Hardlink(format!("long/pax/{LONG}/{LONG}/{LONG}")),
        Meta::new(0o644),
    );
    l.file("names/.whatever", b"not a whiteout", 0o644)
        .file("names/.wh", b"not a whiteout either", 0o644)
        .file("names/with space", b"space", 0o644)
        .file("names/caf\u{e9}-\u{65e5}\u{672c}", b"utf-8", 0o644)
        .file("./names/dotslash", b"./ prefix", 0o644)
        .file("/names/absolute", b"/ prefix", 0o644)
        .dir("names/trailing/", 0o711)
        .file("implicit/a/b/c/file", b"no parent entries", 0o644)
        .file("dup/x", b"first", 0o644)
        .file("dup/x", b"second wins", 0o600)
        .file("dup/y", b"file first", 0o644)
        .sym("dup/y", "then a symlink")
        .dir("dup/z", 0o755)
        .file("dup/z/child", b"child", 0o644)
        .file("dup/z", b"then a file", 0o644)
        .e(
            "xattrs",
            Kind::Dir,
            Meta::new(0o755).xattr("user.dir", b"on a dir"),
        )
        .e(
            "xattrs/file",
            Kind::File(b"x".to_vec()),
            Meta::new(0o644)
                .xattr("user.a", b"alpha")
                .xattr("user.bin", &[0, 1, 2, 255, 0])
                .xattr("user.empty", b""),
        )
        .e(
            "xattrs/overlay",
            Kind::Dir,
            Meta::new(0o755)
                .xattr("trusted.overlay.opaque", b"y")
                .xattr("trusted.other", b"kept"),
        )
        .file("xattrs/overlay/inside", b"x", 0o644)
        .e(
            "times/frac",
            Kind::File(b"t".to_vec()),
            Meta {
                pax_mtime: Some("1700000000.987654321".into()),
                ..Meta::new(0o644)
            },
        )
        .e(
            "times/zero",
            Kind::File(b"t".to_vec()),
            Meta::new(0o644).mtime(0),
        )
        .e(
            "times/future",
            Kind::File(b"t".to_vec()),
            Meta::new(0o644).mtime(4_102_444_800),
        );
    // V7 headers: `\0`-typed regular files (and a name ending in `/`, which old tars
    // meant as a directory).
    l.ef(
        Flavour::V7,
        "v7/file",
        Kind::File(b"v7".to_vec()),
        Meta::new(0o644),
    )
    .ef(
        Flavour::V7,
        "v7/dir/",
        Kind::File(Vec::new()),
        Meta::new(0o755),
    );
    // Lower content the next layers delete, replace or merge.
    l.file("wh/file", b"f", 0o644)
        .file("wh/dir/a", b"a", 0o644)
        .file("wh/dir/sub/b", b"b", 0o644)
        .sym("wh/sym", "file")
        .file("opq/a", b"a", 0o644)
        .file("opq/sub/b", b"b", 0o644)
        .hard("opq/link_out", "hl/f")
        .file("opq2/a", b"a", 0o644)
        .file("wr/a", b"lower a", 0o644)
        .file("wr/b", b"lower b", 0o644)
        .file("wr/d/lower", b"lower", 0o644)
        .file("wr/e/lower", b"lower", 0o644)
        .file("tc/f2d", b"file", 0o644)
        .file("tc/d2s/inner", b"inner", 0o644)
        .sym("tc/s2f", "nowhere")
        .file("tc/d2f/inner", b"inner", 0o644)
        .file("tc/f2s", b"file", 0o644)
        .e("tc/fifo2file", Kind::Fifo, Meta::new(0o644))
        .e("tc/dev2dir", Kind::Char(1, 5), Meta::new(0o644))
        .sym("tc/s2d", "elsewhere")
        .e(
            "merged",
            Kind::Dir,
            Meta::new(0o755)
                .xattr("user.a", b"lower")
                .xattr("trusted.t", b"lower"),
        )
        .file("merged/lower", b"lower", 0o644)
        .sym("dl", "usr/missing")
        .file("opt2/a", b"a", 0o644)
        .sym("optl", "opt2")
        .sym("lib2", "usr/lib")
        .e(
            "modes/full",
            Kind::File(b"st_mode bits".to_vec()),
            Meta::new(0o100_755),
        )
        .e(
            "times/negative",
            Kind::File(b"t".to_vec()),
            Meta {
                pax_mtime: Some("-1.5".into()),
                ..Meta::new(0o644)
            },
        );
    layers.push(l.done("base", Codec::Gzip));

    // Whiteouts, opaque markers, same-layer whiteout and re-create, type changes.
    let mut l = L::new(Flavour::Ustar);
    l.wh("wh/.wh.file")
        .wh("wh/.wh.dir")
        .wh("wh/.wh.sym")
        .wh("wh/.wh.not-there")
        .wh("chain/.wh.b")
        .wh("hl/.wh.g")
        .wh("sizes/.wh.s511")
        .wh("priv/.wh..wh..opq")
        .wh("opq/.wh..wh..opq")
        .file("opq/new", b"new", 0o644)
        .file("opq2/new", b"new before the marker", 0o644)
        .wh("opq2/.wh..wh..opq")
        .wh("wr/.wh.a")
        .file("wr/a", b"upper a", 0o600)
        .file("wr/b", b"upper b", 0o600)
        .wh("wr/.wh.b")
        .wh("wr/.wh.d")
        .file("wr/d/upper", b"upper", 0o644)
        .file("wr/e/upper", b"upper", 0o644)
        .wh("wr/.wh.e")
        .dir("tc/f2d", 0o750)
        .file("tc/f2d/child", b"child", 0o644)
        .sym("tc/d2s", "../usr")
        .file("tc/s2f", b"now a file", 0o644)
        .file("tc/d2f", b"now a file", 0o644)
        .sym("tc/f2s", "f2d/child")
        .file("tc/fifo2file", b"was a fifo", 0o644)
        .dir("tc/dev2dir", 0o700)
        .dir("tc/s2d", 0o755)
        .e(
            "merged",
            Kind::Dir,
            Meta::new(0o711).owner(1000, 1000).xattr("user.b", b"upper"),
        )
        .file("merged/upper", b"upper", 0o644)
        .file("lib/x", b"through lib -> usr/lib", 0o644)
        .file("bin/tool", b"through bin -> /usr/bin", 0o755)
        .hard("hl/k", "hl/f")
        .hard("hl/h", "sizes/s0")
        .file("ro/added", b"added to a read-only dir", 0o644)
        .e("ro", Kind::Dir, Meta::new(0o500))
        // Through a dangling parent symlink, an opaque marker and a whiteout of a
        // symlink to a directory (the link goes, the directory stays).
        .file("dl/file", b"under a dangling parent", 0o644)
        .wh("optl/.wh..wh..opq")
        .file("optl/b", b"b", 0o644)
        .wh(".wh.lib2");
    layers.push(l.done("whiteouts", Codec::Plain));

    // Types change back, whiteouts through symlinked parents, a hardlink group shrinks.
    let mut l = L::new(Flavour::Pax);
    l.sym("tc/f2d", "elsewhere")
        .dir("tc/d2s", 0o755)
        .file("tc/d2s/again", b"a dir again", 0o644)
        .e("tc/s2f", Kind::Fifo, Meta::new(0o640))
        .wh("lib/.wh.x")
        .file("lib/y", b"y", 0o644)
        .file("hl/f", b"replaced: the group keeps the old inode", 0o644)
        .wh("hl/sub/.wh..wh..opq")
        .e("merged", Kind::Dir, Meta::new(0o2755).owner(0, 100_000))
        .e(
            "usr/bin/ping",
            Kind::File(b"ping2".to_vec()),
            Meta::new(0o4711)
                .owner(0, 0)
                .xattr("security.capability", &cap),
        )
        .wh(".wh.priv")
        .file("priv", b"the private dir is a file now", 0o600)
        .file(
            "opq/sub/c",
            b"under a dir that the opaque marker emptied",
            0o644,
        );
    layers.push(l.done("types-back", Codec::Zstd));
    layers
}

/// What the model knows of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    Other,
}

/// The tree as the layers so far leave it (only what validity needs).
#[derive(Debug, Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
    created: BTreeSet<String>,
}

fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = path;
    while let Some((head, _)) = p.rsplit_once('/') {
        out.push(head.to_owned());
        p = head;
    }
    out
}

impl Model {
    fn parents_ok(&self, path: &str) -> bool {
        ancestors(path)
            .iter()
            .all(|a| self.nodes.get(a).is_none_or(|n| *n == Node::Dir))
    }

    fn remove_tree(&mut self, path: &str) {
        let prefix = format!("{path}/");
        self.nodes
            .retain(|p, _| p != path && !p.starts_with(&prefix));
    }

    fn put(&mut self, path: &str, node: Node) {
        if !(node == Node::Dir && self.nodes.get(path) == Some(&Node::Dir)) {
            self.remove_tree(path);
        }
        for a in ancestors(path) {
            self.nodes.entry(a.clone()).or_insert(Node::Dir);
            self.created.insert(a);
        }
        self.nodes.insert(path.to_owned(), node);
        self.created.insert(path.to_owned());
    }

    fn clear_lower(&mut self, dir: &str) {
        let prefix = format!("{dir}/");
        let children: Vec<String> = self
            .nodes
            .keys()
            .filter(|p| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
            .cloned()
            .collect();
        for child in children {
            if self.created.contains(&child) {
                if self.nodes[&child] == Node::Dir {
                    self.clear_lower(&child);
                }
            } else {
                self.remove_tree(&child);
            }
        }
    }

    fn whiteout(&mut self, path: &str) {
        if self.created.contains(path) {
            if self.nodes.get(path) == Some(&Node::Dir) {
                self.clear_lower(path);
            }
        } else {
            self.remove_tree(path);
        }
    }
}

fn random_path(rng: &mut Rng) -> String {
    const NAMES: [&str; 4] = ["a", "b", "c", LONG];
    let depth = 1 + rng.below(3);
    let mut path = String::from("rnd");
    for _ in 0..depth {
        path.push('/');
        // The long name is rarer: it makes every path below it long.
        let name = if rng.chance(10) {
            NAMES[3]
        } else {
            NAMES[rng.below(3)]
        };
        path.push_str(name);
    }
    path
}

fn random_meta(rng: &mut Rng, modes: &[u32], xattrs: bool) -> Meta {
    let mut meta = Meta::new(*rng.pick(modes))
        .owner(*rng.pick(&UIDS), *rng.pick(&UIDS))
        .mtime(1_500_000_000 + rng.next() % 200_000_000);
    if xattrs && rng.chance(20) {
        let len = 1 + rng.below(40);
        meta = meta.xattr("user.rnd", &rng.bytes(len));
    }
    if xattrs && rng.chance(10) {
        let len = rng.below(8);
        meta = meta.xattr("trusted.rnd", &rng.bytes(len));
    }
    meta
}

/// Random layers over `rnd/`.
fn random(rng: &mut Rng, count: usize) -> Vec<GenLayer> {
    let mut model = Model::default();
    let mut layers = Vec::new();
    for i in 0..count {
        model.created.clear();
        let mut tar = Tarball::new();
        if i == 0 {
            tar.entry(Flavour::Gnu, "rnd", &Kind::Dir, &Meta::new(0o755));
            model.put("rnd", Node::Dir);
        }
        let ops = 8 + rng.below(10);
        let mut done = 0;
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        while done < ops {
            let path = random_path(rng);
            if !model.parents_ok(&path) {
                continue;
            }
            let flavour = *rng.pick(&FLAVOURS);
            match rng.below(100) {
                0..=29 => {
                    let size = *rng.pick(&SIZES);
                    let data = rng.bytes(size);
                    let meta = random_meta(rng, &FILE_MODES, true);
                    tar.entry(flavour, &path, &Kind::File(data), &meta);
                    *counts.entry("file").or_default() += 1;
                    model.put(&path, Node::Other);
                }
                30..=44 => {
                    let meta = random_meta(rng, &DIR_MODES, true);
                    tar.entry(flavour, &path, &Kind::Dir, &meta);
                    *counts.entry("dir").or_default() += 1;
                    model.put(&path, Node::Dir);
                }
                45..=54 => {
                    let target = match rng.below(4) {
                        0 => "a".to_owned(),
                        1 => "../b/c".to_owned(),
                        2 => "/rnd/a".to_owned(),
                        _ => format!("dangling-{}", rng.below(1000)),
                    };
                    let meta = random_meta(rng, &[0o777], false);
                    tar.entry(flavour, &path, &Kind::Symlink(target), &meta);
                    *counts.entry("symlink").or_default() += 1;
                    model.put(&path, Node::Other);
                }
                55..=66 => {
                    let prefix = format!("{path}/");
                    let targets: Vec<String> = model
                        .nodes
                        .iter()
                        .filter(|(p, n)| {
                            **n == Node::Other && **p != path && !p.starts_with(&prefix)
                        })
                        .map(|(p, _)| p.clone())
                        .collect();
                    if targets.is_empty() {
                        continue;
                    }
                    let target = rng.pick(&targets).clone();
                    tar.entry(flavour, &path, &Kind::Hardlink(target), &Meta::new(0o644));
                    *counts.entry("hardlink").or_default() += 1;
                    model.put(&path, Node::Other);
                }
                67..=71 => {
                    let meta = random_meta(rng, &[0o600, 0o644, 0o666], false);
                    tar.entry(flavour, &path, &Kind::Fifo, &meta);
                    *counts.entry("fifo").or_default() += 1;
                    model.put(&path, Node::Other);
                }
                72..=89 => {
                    let (dir, base) = path.rsplit_once('/').unwrap();
                    let wh = format!("{dir}/.wh.{base}");
                    tar.entry(flavour, &wh, &Kind::File(Vec::new()), &Meta::new(0o644));
                    *counts.entry("whiteout").or_default() += 1;
                    model.whiteout(&path);
                }
                _ => {
                    let dirs: Vec<String> = model
                        .nodes
                        .iter()
                        .filter(|(_, n)| **n == Node::Dir)
                        .map(|(p, _)| p.clone())
                        .collect();
                    let dir = rng.pick(&dirs).clone();
                    let marker = format!("{dir}/.wh..wh..opq");
                    tar.entry(flavour, &marker, &Kind::File(Vec::new()), &Meta::new(0o644));
                    *counts.entry("opaque").or_default() += 1;
                    model.clear_lower(&dir);
                }
            }
            done += 1;
        }
        let codec = [Codec::Plain, Codec::Gzip, Codec::Zstd][i % 3];
        layers.push(GenLayer {
            name: format!("random-{i}"),
            entries: tar.entries,
            tar: tar.finish(),
            codec,
            ops: counts,
        });
    }
    layers
}

/// Every layer of the differential image, in order.
pub fn layers(seed: u64, random_layers: usize) -> Vec<GenLayer> {
    let mut rng = Rng::new(seed);
    let mut out = scripted(&mut rng);
    out.extend(random(&mut rng, random_layers));
    out
}

/// A file capability (VFS v2, cap_net_raw permitted and effective).
pub fn capability() -> Vec<u8> {
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    cap
}
