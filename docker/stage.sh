#!/usr/bin/env bash
# Builds NanoBox binaries on this machine and stages them in target/docker/, where the
# images' `prebuilt` stage (--build-arg BINARIES=prebuilt) takes them from. The Tiltfile
# runs it on every source change; `cargo xtask check-deploy` runs it for the gateway.
#
# Usage: docker/stage.sh [--release] [SERVICE...]
#   SERVICE: gateway, scheduler, template-builder, node-agent (default: all four).
#   --release: release binaries (default: the dev profile, faster to rebuild).
#
# Also staged: the static guest init (template-builder, node-agent) and the guest kernel
# (node-agent), built as `cargo xtask setup` builds them (both cached by their inputs;
# the first kernel build takes 6 to 8 minutes and needs Debian's linux-source, see
# docs/deployment.md). Files are replaced only when their content changed, each by a
# rename, so a running container never syncs a half-written binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=dev
services=()
for arg in "$@"; do
    case "$arg" in
        --release) profile=release ;;
        gateway|scheduler|template-builder|node-agent) services+=("$arg") ;;
        *) echo "docker/stage.sh: unknown argument $arg (see the usage at the top)" >&2; exit 2 ;;
    esac
done
[[ ${#services[@]} -gt 0 ]] || services=(gateway scheduler template-builder node-agent)

out=target/docker
mkdir -p "$out"
cargo_args=()
bins=()
need_init=false
need_kernel=false
for svc in "${services[@]}"; do
    case "$svc" in
        gateway) cargo_args+=(-p nanobox-gateway --bin nanobox-gateway); bins+=(nanobox-gateway) ;;
        scheduler) cargo_args+=(-p nanobox-scheduler-service --bin nanobox-scheduler); bins+=(nanobox-scheduler) ;;
        template-builder)
            cargo_args+=(-p nanobox-template-builder --bin nanobox-template-builder)
            bins+=(nanobox-template-builder); need_init=true ;;
        node-agent)
            cargo_args+=(-p nanobox-node-agent --bin nanobox-node-agent)
            bins+=(nanobox-node-agent); need_init=true; need_kernel=true ;;
    esac
done

# Copies $1 to $out/$2 unless the staged copy is already the same.
stage() {
    if ! cmp -s "$1" "$out/$2"; then
        cp "$1" "$out/.$2.tmp"
        chmod 0755 "$out/.$2.tmp"
        mv -f "$out/.$2.tmp" "$out/$2"
        echo "staged $out/$2"
    fi
}

cargo build --locked --profile "$profile" "${cargo_args[@]}"
dir=$([[ $profile == dev ]] && echo debug || echo release)
for bin in "${bins[@]}"; do
    stage "target/$dir/$bin" "$bin"
done

if $need_init; then
    # Static, with the target given so that the flag reaches the init and not build scripts.
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked -p nanobox-init \
        --profile guest --target x86_64-unknown-linux-gnu
    stage target/x86_64-unknown-linux-gnu/guest/nanobox-init nanobox-init
fi
if $need_kernel; then
    stage "$(guest/kernel/build.sh)" vmlinux
fi
