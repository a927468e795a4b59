# Image ghcr.io/strata-storage/strata-csi: the CSI driver (controller
# Deployment and node DaemonSet). Build from the repository root:
#   docker build -f deploy/docker/strata-csi.Dockerfile -t ghcr.io/strata-storage/strata-csi:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The protobuf files compile with protox (pure Rust): no protoc needed.
COPY . .
RUN cargo build --release --locked -p strata-csi --bin strata-csi

FROM debian:bookworm-slim
# What the node plugin runs: nbdfuse and nbdinfo (attach without the nbd
# module), nbd-client (with it), losetup/blockdev/mount (util-linux),
# mkfs/fsck/resize for ext4 and xfs, fuse3 for nbdfuse's mount.
RUN apt-get update && apt-get install -y --no-install-recommends \
        nbdfuse libnbd-bin nbd-client fuse3 util-linux mount e2fsprogs xfsprogs ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/strata-csi /usr/local/bin/strata-csi
ENTRYPOINT ["/usr/local/bin/strata-csi"]
