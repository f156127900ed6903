# nanobox-scheduler: the public Sandboxes and Cluster gRPC APIs and the NodeRegistry node
# agents report to (placement over the cluster's nodes).
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/scheduler.Dockerfile -t nanobox-scheduler .
#   docker build -f docker/scheduler.Dockerfile --build-arg BINARIES=prebuilt -t nanobox-scheduler .
#
# Listens on 50051 (gRPC: nanobox.v1, NodeRegistry, grpc.health.v1, reflection) and 9090
# (Prometheus /metrics). Reaches Postgres ([database] url) and the object store
# ([object_store] location, S3 over TLS: hence the CA certificates).

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# `build`: compile in the image. `prebuilt`: copy binaries from PREBUILT_DIR.
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nanobox-scheduler-service --bin nanobox-scheduler \
    && install -D -m 0755 target/release/nanobox-scheduler /out/bin/nanobox-scheduler

FROM scratch AS prebuilt
ARG PREBUILT_DIR=target/docker
COPY ${PREBUILT_DIR}/nanobox-scheduler /out/bin/nanobox-scheduler

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
# Unpinned on purpose: the base image fixes the Debian release, and security updates of
# the package should reach the next build rather than break it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Root (the default) owns the binary; a development build passes the service's uid so
# that live update can replace it (see gateway.Dockerfile).
ARG BIN_OWNER=0:0
COPY --from=binaries --chown=${BIN_OWNER} /out/bin/ /opt/nanobox/bin/
ENV PATH=/opt/nanobox/bin:$PATH \
    NANOBOX__API__GRPC_ADDR=0.0.0.0:50051 \
    NANOBOX__SCHEDULER__METRICS_ADDR=0.0.0.0:9090
# The scheduler keeps its state in Postgres and writes no local files.
USER 10001:10001
EXPOSE 50051 9090
# Kubernetes ignores HEALTHCHECK; the chart uses gRPC probes (grpc.health.v1).
HEALTHCHECK NONE
ENTRYPOINT ["/opt/nanobox/bin/nanobox-scheduler"]
