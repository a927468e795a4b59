# Image ghcr.io/strata-storage/strata-node: a storage node (the storage-node
# DaemonSet). Build from the repository root:
#   docker build -f deploy/docker/strata-node.Dockerfile -t ghcr.io/strata-storage/strata-node:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The protobuf files compile with protox (pure Rust): no protoc needed.
COPY . .
RUN cargo build --release --locked -p strata-node --bin strata-node

FROM debian:bookworm-slim
# /bin/sh and cp stay: the DaemonSet's init container uses them to install
# the seccomp profile on the host.
COPY --from=build /src/target/release/strata-node /usr/local/bin/strata-node
ENTRYPOINT ["/usr/local/bin/strata-node"]
