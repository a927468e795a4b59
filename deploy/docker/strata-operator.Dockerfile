# Image ghcr.io/strata-storage/strata-operator: the PostgresCluster controller
# (deploy/operator). Build from the repository root:
#   docker build -f deploy/docker/strata-operator.Dockerfile -t ghcr.io/strata-storage/strata-operator:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p strata-operator --bin strata-operator

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/strata-operator /usr/local/bin/strata-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/strata-operator"]
