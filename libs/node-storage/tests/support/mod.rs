//! Real parts for the node storage tests: small ext4 images built with `mkfs.ext4 -d`,
//! and a loop-mounted XFS file system with reflinks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command, panicking with its stderr if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds an ext4 image of `size_mib` at `out` holding `files` (name, content) and a
/// marker file that makes images with different `label`s differ.
pub fn make_ext4(out: &Path, size_mib: u64, label: &str, files: &[(&str, Vec<u8>)]) {
    let staging = tempfile::tempdir().unwrap();
    std::fs::write(staging.path().join("marker"), label).unwrap();
    std::fs::create_dir_all(staging.path().join("etc")).unwrap();
    for (name, content) in files {
        std::fs::write(staging.path().join(name), content).unwrap();
    }
    let file = std::fs::File::create(out).unwrap();
    file.set_len(size_mib << 20).unwrap();
    drop(file);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", label, "-d"])
        .arg(staging.path())
        .arg(out));
}

/// Pseudo-random bytes (xorshift), so content does not compress or deduplicate away.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// 512-byte blocks allocated to a file (`stat` st_blocks).
pub fn allocated_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().blocks()
}

/// An XFS file system with reflinks, in a sparse image file, on a loop device mounted in
/// a temporary directory. Dropping it (also while a test panics) unmounts the file
/// system and detaches the loop device.
pub struct XfsMount {
    pub mountpoint: PathBuf,
    loop_dev: String,
    // Held for the image file and the mount point; removed after unmounting.
    _dir: tempfile::TempDir,
}

impl XfsMount {
    /// Needs root, `mkfs.xfs` (xfsprogs) and loop devices.
    pub fn new(size_mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("xfs.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(size_mib << 20).unwrap();
        drop(file);
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        let loop_dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image))
        .trim()
        .to_owned();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        // From here on Drop cleans up, so a failed mount still detaches the device.
        let mount = Self {
            mountpoint,
            loop_dev,
            _dir: dir,
        };
        run(Command::new("mount")
            .args(["-t", "xfs"])
            .arg(&mount.loop_dev)
            .arg(&mount.mountpoint));
        mount
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        // Bounded retries: a file still being closed can make the first umount busy.
        for attempt in 0..20 {
            let out = Command::new("umount").arg(&self.mountpoint).output();
            match out {
                Ok(o) if o.status.success() => break,
                Ok(o) if String::from_utf8_lossy(&o.stderr).contains("not mounted") => break,
                _ if attempt == 19 => {
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(&self.mountpoint)
                        .status();
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_dev)
            .status();
    }
}
