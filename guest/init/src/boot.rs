//! What PID 1 does before serving: mount the pseudo filesystems, bring up loopback,
//! and the identity settings the host may change later (hostname, entropy, clock, eth0).

use std::net::Ipv4Addr;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use crate::log;
use crate::sys;

/// Mounts proc, sys, devtmpfs, devpts, /run, /tmp and cgroup2 (each skipped when already
/// mounted or when the image lacks the mount point and it cannot be created).
pub fn mount_filesystems() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 8] = [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let path = Path::new(target);
        if !path.exists() {
            if let Err(e) = nix::unistd::mkdir(path, Mode::from_bits_truncate(0o755)) {
                log!("cannot create {target}: {e}");
                continue;
            }
        }
        match mount(Some(source), path, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => log!("mount {fstype} on {target}: {e}"),
        }
    }
    // /dev/ptmx must point into devpts for pseudo-terminals to work.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
}

pub fn loopback_up() {
    if let Err(e) = sys::link_up("lo") {
        log!("bringing up lo: {e}");
    }
}

pub fn set_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("invalid hostname {name:?}"));
    }
    // Only the kernel's name: writing /etc/hostname would touch the image's filesystem on
    // every hand-over for no reader that matters (hostname(1) asks the kernel).
    nix::unistd::sethostname(name).map_err(|e| format!("sethostname: {e}"))
}

pub fn set_clock(unix_time_ns: u64) -> Result<(), String> {
    if unix_time_ns == 0 {
        return Ok(());
    }
    let secs = i64::try_from(unix_time_ns / 1_000_000_000).map_err(|e| e.to_string())?;
    let nanos = i64::try_from(unix_time_ns % 1_000_000_000).map_err(|e| e.to_string())?;
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("clock_settime: {e}"))
}

/// Configures eth0 from a CIDR address, gateway and resolvers.
pub fn configure_eth0(
    address: &str,
    gateway: &str,
    dns: &[String],
    mtu: u32,
) -> Result<(), String> {
    if address.is_empty() {
        return Ok(());
    }
    let (ip, prefix) = address
        .split_once('/')
        .ok_or_else(|| format!("address {address:?} is not in CIDR form"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("bad IPv4 address {ip:?}"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("bad prefix length {prefix:?}"))?;
    let mtu = (mtu != 0).then_some(mtu);
    sys::set_ipv4("eth0", ip, prefix, mtu).map_err(|e| format!("eth0 address: {e}"))?;
    sys::link_up("eth0").map_err(|e| format!("eth0 up: {e}"))?;
    if !gateway.is_empty() {
        let gw: Ipv4Addr = gateway
            .parse()
            .map_err(|_| format!("bad gateway {gateway:?}"))?;
        sys::add_default_route(gw).map_err(|e| format!("default route: {e}"))?;
    }
    if !dns.is_empty() {
        let mut text = String::new();
        for server in dns {
            let addr: std::net::IpAddr = server
                .parse()
                .map_err(|_| format!("bad DNS server {server:?}"))?;
            text.push_str(&format!("nameserver {addr}\n"));
        }
        std::fs::write("/etc/resolv.conf", text).map_err(|e| format!("resolv.conf: {e}"))?;
    }
    Ok(())
}

/// Starts the image's sshd when it has one. Host keys are generated on first start.
pub async fn start_sshd(reaper: &crate::reaper::Reaper) {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(sshd) = sshd else { return };
    if Path::new("/usr/bin/ssh-keygen").exists() {
        let mut keygen = std::process::Command::new("/usr/bin/ssh-keygen");
        keygen.arg("-A");
        if let Ok((_child, exit)) = reaper.spawn(&mut keygen) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), exit).await;
        }
    }
    let _ = std::fs::create_dir_all("/run/sshd");
    let mut cmd = std::process::Command::new(sshd);
    match reaper.spawn(&mut cmd) {
        Ok(_) => log!("started {sshd}"),
        Err(e) => log!("starting {sshd}: {e}"),
    }
}
