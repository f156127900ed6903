# nanobox-node-agent: the NodeAgent gRPC API. Boots and runs the sandboxes' microVMs on
# one machine (QEMU -M microvm; Firecracker when its binary is added and KVM works).
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/node-agent.Dockerfile -t nanobox-node-agent .
#   docker build -f docker/node-agent.Dockerfile --build-arg BINARIES=prebuilt -t nanobox-node-agent .
# `build` also builds the guest kernel from Debian's linux-source (6 to 8 minutes on two
# cores). `prebuilt` takes nanobox-node-agent, nanobox-init and vmlinux from
# target/docker/ (`cargo xtask setup` builds the kernel and the init; see docker/README.md).
#
# Listens on 50071 (gRPC: NodeAgent, grpc.health.v1, reflection) and 9090 (Prometheus
# /metrics).
#
# What it needs from the host, and why (the chart's DaemonSet grants it; see
# helm/README.md). The agent itself runs as root; QEMU drops to the `nanobox` user
# ([agent] run_as_user) and runs under its own seccomp filter.
#   /dev/kvm              hardware virtualisation (without it QEMU falls back to TCG,
#                         software emulation: it works, slowly)
#   /dev/net/tun          one TAP device per sandbox
#   /dev/vhost-vsock      the guest agent's vsock transport (vhost-vsock-device)
#   /dev/vhost-net        (optional) faster virtio-net
#   CAP_NET_ADMIN         network namespaces' links, the bridge, veth pairs, TAP devices,
#                         nftables rules (isolation, NAT, rate limits with tc)
#   CAP_SYS_ADMIN         creating and bind-mounting network namespaces on /run/netns,
#                         setns(2) into them (nsenter), mounts
#   CAP_SYS_RESOURCE, CAP_SETUID/SETGID, CAP_KILL, CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER
#                         QEMU's -runas, limits, cleaning up VMs and their files
#   cgroup v2, writable   one cgroup per VM (CPU quota, memory limit) under
#                         [agent] cgroup_parent; a container's /sys/fs/cgroup is read-only
#                         unless the container is privileged
#   /run/netns            shared (Bidirectional) mount propagation, so the sandbox
#                         namespaces outlive a restart of the container and are cleaned
#                         up by the next start
#   /var/lib/nanobox      state: records, copy-on-write disks, templates, run directories
# Device access through the device cgroup and a writable cgroupfs are what `privileged`
# gives and capabilities alone do not, so the chart runs it privileged by default.

# Root on purpose (above): the final USER is root.
# hadolint global ignore=DL3002

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# `build`: compile in the image. `prebuilt`: copy binaries from PREBUILT_DIR.
ARG BINARIES=build

# The guest kernel: guest/kernel/build.sh over Debian's linux-source, as on a host.
FROM ${RUST_IMAGE} AS kernel
# Unpinned on purpose: the kernel's source is whatever linux-source bookworm carries, the
# same the host build uses; pin the base image to pin it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends linux-source bc flex bison libelf-dev \
        libssl-dev xz-utils \
    && rm -rf /var/lib/apt/lists/*
COPY guest/kernel /src/guest/kernel
ENV NANOBOX_CACHE_DIR=/kernel-cache
RUN install -D -m 0644 "$(/src/guest/kernel/build.sh)" /out/lib/vmlinux \
    && rm -rf /kernel-cache

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The guest init is static so that it runs in any guest image, whatever libc it has.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nanobox-node-agent --bin nanobox-node-agent \
    && RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked -p nanobox-init \
        --profile guest --target x86_64-unknown-linux-gnu \
    && install -D -m 0755 target/release/nanobox-node-agent /out/bin/nanobox-node-agent \
    && install -D -m 0755 target/x86_64-unknown-linux-gnu/guest/nanobox-init /out/lib/nanobox-init
COPY --from=kernel /out/lib/vmlinux /out/lib/vmlinux

FROM scratch AS prebuilt
ARG PREBUILT_DIR=target/docker
COPY ${PREBUILT_DIR}/nanobox-node-agent /out/bin/
COPY ${PREBUILT_DIR}/nanobox-init ${PREBUILT_DIR}/vmlinux /out/lib/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
# QEMU and qemu-img (copy-on-write overlays), iproute2 (ip, tc), nftables, e2fsprogs
# (resize2fs); nsenter comes with the base image's util-linux. Unpinned on purpose: the
# base image fixes the Debian release, and security updates should reach the next build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils iproute2 \
        nftables e2fsprogs ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10002 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nanobox
ARG BIN_OWNER=0:0
COPY --from=binaries --chown=${BIN_OWNER} /out/bin/ /opt/nanobox/bin/
# The guest kernel and init stay root's: every VM boots them.
COPY --from=binaries /out/lib/ /usr/local/lib/nanobox/
ENV PATH=/opt/nanobox/bin:$PATH \
    NANOBOX_CACHE_DIR=/var/cache/nanobox \
    NANOBOX__AGENT__LISTEN_ADDR=0.0.0.0:50071 \
    NANOBOX__AGENT__METRICS_ADDR=0.0.0.0:9090 \
    NANOBOX__AGENT__STATE_DIR=/var/lib/nanobox/agent \
    NANOBOX__AGENT__TEMPLATE_CACHE_DIR=/var/lib/nanobox/templates \
    NANOBOX__AGENT__ROOTFS_DIR=/var/lib/nanobox/rootfs \
    NANOBOX__AGENT__SNAPSHOT_DIR=/var/lib/nanobox/snapshots \
    NANOBOX__AGENT__RUN_AS_USER=nanobox \
    NANOBOX__FIRECRACKER__KERNEL=/usr/local/lib/nanobox/vmlinux
# The agent needs root for the reasons above; the VMs it starts do not run as root.
# trivy:ignore:DS002
USER 0:0
EXPOSE 50071 9090
# Kubernetes ignores HEALTHCHECK; the chart uses gRPC probes (grpc.health.v1).
HEALTHCHECK NONE
ENTRYPOINT ["/opt/nanobox/bin/nanobox-node-agent"]
