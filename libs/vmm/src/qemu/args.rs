//! The QEMU command line for a spec: a pure function, so every flag is unit-tested.

use std::ffi::OsString;

use crate::{Accel, VmSpec};

/// Settings of the QEMU backend that are not part of a VM spec.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: std::path::PathBuf,
    pub accel: crate::AccelChoice,
    /// TCG translation cache per VM. QEMU's default (1 GiB of reservation, much of it
    /// touched) dominates a small guest's host memory; 16 MiB measured no slower to boot.
    pub tb_size_mib: u32,
    /// Skip the guest's LAPIC timer calibration under TCG (`noapictimer`): ~240 ms off
    /// each boot, at ~0.9% of a host core per idle guest. Off for long-lived idle guests.
    pub fast_boot_timer: bool,
    /// Where `accel = auto` keeps its probe result between processes.
    pub accel_cache: Option<std::path::PathBuf>,
    /// Confine QEMU with its seccomp filter (`-sandbox on`): no obsolete syscalls, no
    /// privilege elevation (setuid and friends), no resource-control syscalls. Spawning
    /// stays allowed because snapshots stream through `exec:cat`.
    pub seccomp: bool,
    /// Drop to this user (name or uid) once QEMU has opened its devices and files
    /// (`-runas`): the disk, TAP and sockets are open before, nothing new after.
    pub run_as: Option<String>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            accel: crate::AccelChoice::Auto,
            tb_size_mib: 16,
            fast_boot_timer: true,
            accel_cache: None,
            seccomp: true,
            run_as: None,
        }
    }
}

/// Descriptor numbers the child finds its pre-opened sockets at.
#[derive(Debug, Clone, Copy)]
pub struct PassedFds {
    pub agent_listener: i32,
    pub qmp_listener: i32,
}

/// The kernel command line for QEMU microvm.
pub fn kernel_cmdline(
    spec: &VmSpec,
    accel: Accel,
    cfg: &QemuConfig,
    tsc_khz: Option<u64>,
) -> String {
    let mut args = vec![
        "console=ttyS0".to_owned(),
        "root=/dev/vda".to_owned(),
        if spec.rootfs.read_only { "ro" } else { "rw" }.to_owned(),
        "quiet".to_owned(),
        // microvm,acpi=off is what makes QEMU add virtio_mmio.device= entries.
        "acpi=off".to_owned(),
        // Reset (not power-off) ends the VM: QEMU runs with -no-reboot.
        "reboot=t".to_owned(),
        "panic=-1".to_owned(),
        "init=/sbin/nanobox-init".to_owned(),
        "i8042.noaux".to_owned(),
        "i8042.nomux".to_owned(),
        "i8042.nopnp".to_owned(),
        "i8042.dumbkbd".to_owned(),
    ];
    if accel == Accel::Tcg {
        // Without a trusted TSC frequency the guest calibrates against slow emulated
        // timers, and under host load falls back to jiffies and idles badly.
        if let Some(khz) = tsc_khz {
            args.push("tsc=reliable".to_owned());
            args.push(format!("tsc_early_khz={khz}"));
        }
        if cfg.fast_boot_timer {
            args.push("noapictimer".to_owned());
            args.push("no_timer_check".to_owned());
        }
    }
    args.extend(spec.extra_kernel_args.iter().cloned());
    args.join(" ")
}

pub fn build_args(
    spec: &VmSpec,
    accel: Accel,
    cfg: &QemuConfig,
    tsc_khz: Option<u64>,
    fds: PassedFds,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    push("-name");
    push(&format!("nanobox-{},process=nanobox-{}", spec.id, spec.id));
    for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
        push(flag);
    }
    push("-display");
    push("none");
    if cfg.seccomp {
        push("-sandbox");
        // The filter is installed before `-runas` drops privileges, and dropping them
        // takes setgid/setuid, which `elevateprivileges=deny` (and, in QEMU 7.2, also
        // `children`) kills the process for. With a user to become, they stay allowed:
        // once every uid is that user's, there is no way back to root through them.
        push(if cfg.run_as.is_some() {
            "on,obsolete=deny,elevateprivileges=allow,resourcecontrol=deny"
        } else {
            "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"
        });
    }
    if let Some(user) = &cfg.run_as {
        push("-runas");
        push(user);
    }
    push("-accel");
    match accel {
        Accel::Tcg => push(&format!("tcg,tb-size={}", cfg.tb_size_mib)),
        Accel::Kvm => push("kvm"),
    }
    push("-M");
    push("microvm,acpi=off");
    push("-cpu");
    push(match accel {
        Accel::Tcg => "max",
        Accel::Kvm => "host",
    });
    push("-smp");
    push(&spec.vcpus.to_string());
    push("-m");
    push(&format!("{}M", spec.memory_mib));
    push("-append");
    push(&kernel_cmdline(spec, accel, cfg, tsc_khz));
    // Console on QEMU's stdout, which the VM's actor reads into a bounded buffer.
    push("-chardev");
    push("stdio,id=con,signal=off");
    push("-serial");
    push("chardev:con");
    push("-device");
    push("virtio-rng-device");
    push("-device");
    push("virtio-blk-device,drive=root");
    push("-device");
    push("virtio-serial-device,max_ports=2");
    push("-chardev");
    push(&format!(
        "socket,id=agent,fd={},server=on,wait=off",
        fds.agent_listener
    ));
    push("-device");
    push("virtserialport,chardev=agent,name=nanobox.agent");
    push("-chardev");
    push(&format!(
        "socket,id=qmp,fd={},server=on,wait=off",
        fds.qmp_listener
    ));
    push("-mon");
    push("chardev=qmp,mode=control");
    a.push("-kernel".into());
    a.push(spec.kernel.clone().into_os_string());
    // The drive's path goes in its own argument with commas doubled, QEMU's escape.
    if let Some(net) = &spec.network {
        // The TAP exists already (the node agent made it, in the VM's namespace); QEMU
        // only opens it: no helper scripts, no privileges needed beyond the device.
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap).into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={}", net.mac).into());
    }
    let format = match spec.rootfs.format {
        crate::DiskFormat::Raw => "raw",
        crate::DiskFormat::Qcow2 => "qcow2",
    };
    let mut drive = OsString::from(format!(
        "id=root,if=none,format={format},discard=unmap,file="
    ));
    drive.push(escape_commas(&spec.rootfs.path));
    if spec.rootfs.read_only {
        drive.push(",readonly=on");
    } else {
        // Open the image read-write now, while QEMU still runs as root. With `-drive`'s
        // default (auto-read-only=on) an image that does not need write permission yet
        // (an incoming migration: a restore) is opened read-only and re-opened
        // read-write on `cont`, after `-runas` has dropped the rights to do so.
        drive.push(",auto-read-only=off");
    }
    if spec.rootfs.ephemeral {
        drive.push(",snapshot=on");
    }
    a.push("-drive".into());
    a.push(drive);
    a
}

fn escape_commas(path: &std::path::Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriveSpec;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new(
            "t1",
            "/k/vmlinux",
            DriveSpec::writable("/r/a,b.ext4"),
            "/run/t1",
        );
        s.vcpus = 2;
        s.memory_mib = 256;
        s.extra_kernel_args = vec!["nanobox.test=1".into()];
        s
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn network_and_qcow2_overlay() {
        let mut s = spec();
        s.network = Some(crate::NetSpec {
            tap: "nbx-tap0".into(),
            mac: "52:54:00:12:34:56".into(),
            rate_limit: None,
        });
        s.rootfs.format = crate::DiskFormat::Qcow2;
        let fds = PassedFds {
            agent_listener: 3,
            qmp_listener: 4,
        };
        let line = joined(&build_args(
            &s,
            Accel::Tcg,
            &QemuConfig::default(),
            None,
            fds,
        ));
        for want in [
            "-netdev tap,id=net0,ifname=nbx-tap0,script=no,downscript=no",
            "-device virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
            "id=root,if=none,format=qcow2,",
            ",auto-read-only=off",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        let hardened = QemuConfig {
            run_as: Some("nobody".into()),
            ..QemuConfig::default()
        };
        let line = joined(&build_args(&spec(), Accel::Tcg, &hardened, None, fds));
        assert!(
            line.contains("-sandbox on,obsolete=deny,elevateprivileges=allow,resourcecontrol=deny")
                && line.contains("-runas nobody"),
            "{line}"
        );
        let plain = joined(&build_args(
            &spec(),
            Accel::Tcg,
            &QemuConfig::default(),
            None,
            fds,
        ));
        assert!(
            !plain.contains("-netdev") && plain.contains("format=raw"),
            "{plain}"
        );
    }

    #[test]
    fn tcg_command_line_has_fast_boot_flags_and_devices() {
        let cfg = QemuConfig::default();
        let fds = PassedFds {
            agent_listener: 3,
            qmp_listener: 4,
        };
        let args = build_args(&spec(), Accel::Tcg, &cfg, Some(2_600_000), fds);
        let line = joined(&args);
        for want in [
            "-accel tcg,tb-size=16",
            "-M microvm,acpi=off",
            "-cpu max",
            "-smp 2",
            "-m 256M",
            "-no-reboot",
            "socket,id=agent,fd=3,server=on,wait=off",
            "virtserialport,chardev=agent,name=nanobox.agent",
            "socket,id=qmp,fd=4,server=on,wait=off",
            "-kernel /k/vmlinux",
            "file=/r/a,,b.ext4",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        let cmdline = kernel_cmdline(&spec(), Accel::Tcg, &cfg, Some(2_600_000));
        for want in [
            "root=/dev/vda rw",
            "tsc_early_khz=2600000",
            "noapictimer",
            "init=/sbin/nanobox-init",
            "nanobox.test=1",
        ] {
            assert!(cmdline.contains(want), "missing {want:?} in {cmdline}");
        }
    }

    #[test]
    fn kvm_uses_host_cpu_and_keeps_the_apic_timer() {
        let cfg = QemuConfig::default();
        let fds = PassedFds {
            agent_listener: 3,
            qmp_listener: 4,
        };
        let line = joined(&build_args(&spec(), Accel::Kvm, &cfg, Some(1), fds));
        assert!(
            line.contains("-accel kvm -M microvm,acpi=off -cpu host"),
            "{line}"
        );
        assert!(!line.contains("noapictimer"), "{line}");
    }

    #[test]
    fn read_only_and_ephemeral_drives() {
        let mut s = spec();
        s.rootfs.read_only = true;
        s.rootfs.ephemeral = true;
        let fds = PassedFds {
            agent_listener: 3,
            qmp_listener: 4,
        };
        let line = joined(&build_args(
            &s,
            Accel::Tcg,
            &QemuConfig::default(),
            None,
            fds,
        ));
        assert!(line.contains(",readonly=on,snapshot=on"), "{line}");
        assert!(line.contains("root=/dev/vda ro"), "{line}");
        assert!(!line.contains("tsc_early_khz"), "{line}");
    }
}
