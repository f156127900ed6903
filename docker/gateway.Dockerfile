# nanobox-gateway: the public REST API (HTTP/JSON over the gRPC services).
#
# Build from the repository root (the context; see docker/README.md):
#   docker build -f docker/gateway.Dockerfile -t nanobox-gateway .
#   docker build -f docker/gateway.Dockerfile --build-arg BINARIES=prebuilt -t nanobox-gateway .
# The second form skips the Rust build and takes target/docker/nanobox-gateway from the
# context (what Tilt and `cargo xtask check-deploy` do).
#
# Listens on 8080 (REST, GET /healthz) and 9090 (Prometheus /metrics). Needs nothing but
# its binary and the configuration (/etc/nanobox/nanobox.toml, mounted by the chart).

# Base images are build arguments so that a build can use local or mirrored bases.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# `build`: compile in the image. `prebuilt`: copy binaries from PREBUILT_DIR.
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nanobox-gateway --bin nanobox-gateway \
    && install -D -m 0755 target/release/nanobox-gateway /out/bin/nanobox-gateway

FROM scratch AS prebuilt
ARG PREBUILT_DIR=target/docker
COPY ${PREBUILT_DIR}/nanobox-gateway /out/bin/nanobox-gateway

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
# Who owns /opt/nanobox/bin and the binary in it. Root (the default) keeps them read-only
# for the service; a development build (Tiltfile) passes the service's uid so that live
# update can replace the binary in a running container.
ARG BIN_OWNER=0:0
COPY --from=binaries --chown=${BIN_OWNER} /out/bin/ /opt/nanobox/bin/
ENV PATH=/opt/nanobox/bin:$PATH \
    NANOBOX__API__LISTEN_ADDR=0.0.0.0:8080 \
    NANOBOX__API__METRICS_ADDR=0.0.0.0:9090
# Any unprivileged uid works: the gateway writes nothing.
USER 10001:10001
EXPOSE 8080 9090
# Kubernetes ignores HEALTHCHECK; the chart probes GET /healthz (and the image has no
# HTTP client to probe with).
HEALTHCHECK NONE
ENTRYPOINT ["/opt/nanobox/bin/nanobox-gateway"]
