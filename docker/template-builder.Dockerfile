# nanobox-template-builder: the Templates gRPC API. Pulls OCI images, applies their layers,
# injects the static guest init and builds the ext4 template it uploads to the object store.
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/template-builder.Dockerfile -t nanobox-template-builder .
#   docker build -f docker/template-builder.Dockerfile --build-arg BINARIES=prebuilt -t nanobox-template-builder .
# `prebuilt` takes target/docker/nanobox-template-builder and target/docker/nanobox-init.
#
# Listens on 50061 (gRPC: nanobox.v1.Templates, grpc.health.v1, reflection) and 9090
# (Prometheus /metrics). Works in /var/lib/nanobox/builder (an emptyDir in the chart).
#
# Runs as root, with few capabilities: applying a layer recreates each entry's owner,
# device nodes and file capabilities, which takes CAP_CHOWN, CAP_FOWNER, CAP_DAC_OVERRIDE,
# CAP_FSETID, CAP_MKNOD and CAP_SETFCAP (the chart grants exactly these and drops the rest).
# A pod with its own user namespace (Kubernetes `hostUsers: false`) keeps even that root
# unprivileged on the host.

# Root on purpose (above): the final USER is root.
# hadolint global ignore=DL3002

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# `build`: compile in the image. `prebuilt`: copy binaries from PREBUILT_DIR.
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The guest init is static (glibc's static libraries are in the Rust image), so it runs
# in any guest image, whatever libc the image has.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nanobox-template-builder --bin nanobox-template-builder \
    && RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked -p nanobox-init \
        --profile guest --target x86_64-unknown-linux-gnu \
    && install -D -m 0755 target/release/nanobox-template-builder /out/bin/nanobox-template-builder \
    && install -D -m 0755 target/x86_64-unknown-linux-gnu/guest/nanobox-init /out/lib/nanobox-init

FROM scratch AS prebuilt
ARG PREBUILT_DIR=target/docker
COPY ${PREBUILT_DIR}/nanobox-template-builder /out/bin/
COPY ${PREBUILT_DIR}/nanobox-init /out/lib/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
# ca-certificates: registries and S3 over TLS. e2fsprogs: mkfs.ext4 -d builds the image.
# Unpinned on purpose: the base image fixes the Debian release, and security updates
# should reach the next build rather than break it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
ARG BIN_OWNER=0:0
COPY --from=binaries --chown=${BIN_OWNER} /out/bin/ /opt/nanobox/bin/
# The init stays root's in every build: it is copied into every template.
COPY --from=binaries /out/lib/ /usr/local/lib/nanobox/
ENV PATH=/opt/nanobox/bin:$PATH \
    NANOBOX__BUILDER__LISTEN_ADDR=0.0.0.0:50061 \
    NANOBOX__BUILDER__METRICS_ADDR=0.0.0.0:9090 \
    NANOBOX__BUILDER__WORK_DIR=/var/lib/nanobox/builder \
    NANOBOX__OCI__INIT_BINARY=/usr/local/lib/nanobox/nanobox-init
# Root, for the reasons above (trivy DS002 is about exactly this).
# trivy:ignore:DS002
USER 0:0
EXPOSE 50061 9090
# Kubernetes ignores HEALTHCHECK; the chart uses gRPC probes (grpc.health.v1).
HEALTHCHECK NONE
ENTRYPOINT ["/opt/nanobox/bin/nanobox-template-builder"]
