#!/usr/bin/env bash
# Builds the tiny test rootfs: Debian's busybox-static, the NanoBox init, an image config.
#
# Usage: guest/rootfs/build-test-rootfs.sh <nanobox-init binary> <out.ext4> [size-MiB]
#
# No loop mounts and no root-only tricks: the tree is staged in a temporary directory and
# turned into an ext4 image by `mkfs.ext4 -d`. The output is written to a temporary name
# and renamed, so a half-built image is never seen under <out.ext4>.
set -euo pipefail

init=${1:?usage: $0 <nanobox-init> <out.ext4> [size-MiB]}
out=${2:?usage: $0 <nanobox-init> <out.ext4> [size-MiB]}
size_mib=${3:-256}
busybox=${BUSYBOX:-/bin/busybox}

# A dynamically linked busybox would need the host's libc inside the image.
if ! "$busybox" --list >/dev/null 2>&1 || LC_ALL=C readelf -l "$busybox" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    echo "need a static busybox at $busybox (apt-get install busybox-static)" >&2
    exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc/nanobox,dev,proc,sys,run,tmp,root,var/tmp,home}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
chmod 0700 "$stage/root"
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    case "$applet" in busybox|init|linuxrc) continue ;; esac
    ln -sf /bin/busybox "$stage/bin/$applet"
done
install -m 0755 "$init" "$stage/sbin/nanobox-init"
# Anything that execs /sbin/init (or a kernel given no init=) still gets the agent.
ln -sf nanobox-init "$stage/sbin/init"

cat >"$stage/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$stage/etc/group" <<'GROUP'
root:x:0:
tty:x:5:
nogroup:x:65534:
GROUP
echo "nanobox" >"$stage/etc/hostname"
cat >"$stage/etc/nanobox/image.json" <<'CONFIG'
{"env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","HOME=/root","NANOBOX_IMAGE=test-rootfs"],"working_dir":"/","user":"","entrypoint":[],"cmd":["/bin/sh"]}
CONFIG

tmp="$out.tmp.$$"
rm -f "$tmp"
truncate -s "${size_mib}M" "$tmp"
mkfs.ext4 -q -F -E root_owner=0:0 -L nanobox-root -d "$stage" "$tmp"
mv "$tmp" "$out"
