#!/usr/bin/env bash
# Builds the NanoBox guest kernel: an uncompressed ELF vmlinux with a PVH entry point,
# from Debian's linux-source package and the project's config fragment (nanobox.config).
#
# The result is cached under $NANOBOX_CACHE_DIR/kernel/<key>/vmlinux, where <key> is a
# hash of every input (the fragment, this script, the kernel source tarball and the
# compiler version), so a second run with the same inputs returns at once.
#
# $NANOBOX_CACHE_DIR/vmlinux is kept pointing at the newest build: the default kernel of
# `nanobox vm run`.
#
# Usage: guest/kernel/build.sh            prints the path of the cached vmlinux
# Needs: apt-get install linux-source build-essential bc flex bison libelf-dev libssl-dev
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/nanobox.config"
cache_root="${NANOBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nanobox}/kernel"
jobs="${NANOBOX_KERNEL_JOBS:-$(nproc)}"

log() { printf '[kernel] %s\n' "$*" >&2; }

tarball=$(ls -1 /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "$tarball" ]]; then
    log "no /usr/src/linux-source-*.tar.xz: install Debian's linux-source package"
    exit 1
fi

key=$( {
    sha256sum "$fragment" "${BASH_SOURCE[0]}" | cut -d' ' -f1
    basename "$tarball"
    stat -c '%s' "$tarball"
    gcc --version | head -n 1
} | sha256sum | cut -c1-16)

out="$cache_root/$key"
publish() {
    ln -sfn "kernel/$key/vmlinux" "$cache_root/../vmlinux.tmp.$$"
    mv -T "$cache_root/../vmlinux.tmp.$$" "$cache_root/../vmlinux"
    echo "$out/vmlinux"
}
if [[ -s "$out/vmlinux" ]]; then
    publish
    exit 0
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "building $(basename "$tarball" .tar.xz) with $(basename "$fragment") (key $key, -j$jobs)"
tar -C "$work" -xf "$tarball"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
cd "$src"

make -s tinyconfig >/dev/null

# Apply the fragment one symbol at a time: scripts/config understands all three forms.
symbols=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            sym=${line%%=*}; val=${line#*=}; sym=${sym#CONFIG_}
            case "$val" in
                y) scripts/config --enable "$sym" ;;
                n) scripts/config --disable "$sym" ;;
                *) scripts/config --set-val "$sym" "$val" ;;
            esac
            symbols+=("$line")
            ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# CONFIG_}; sym=${sym%% is not set}
            scripts/config --disable "$sym"
            symbols+=("$line")
            ;;
    esac
done <"$fragment"

make -s olddefconfig >/dev/null

# Kconfig drops symbols whose dependencies are unmet without a word: check every one.
missing=0
for want in "${symbols[@]}"; do
    case "$want" in
        "# CONFIG_"*)
            sym=${want#\# }; sym=${sym%% is not set}
            if grep -q "^$sym=" .config; then log "wanted off but is on: $sym"; missing=1; fi
            ;;
        *)
            if ! grep -qx "$want" .config; then
                log "did not take effect: $want (got: $(grep "^${want%%=*}=" .config || echo unset))"
                missing=1
            fi
            ;;
    esac
done
if [[ $missing -ne 0 ]]; then
    log "config fragment did not apply cleanly"
    exit 1
fi

make -s -j"$jobs" vmlinux >/dev/null
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
publish
