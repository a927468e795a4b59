# Image ghcr.io/strata-storage/postgres:VERSION: PostgreSQL with
# strata-instance, the instance manager that the operator's Pods run as their
# command (it starts postgres from /usr/lib/postgresql/VERSION/bin as its
# child, as the `postgres` user, uid 999 in Debian's packages). One image per
# supported major version (15, 16, 17), from the PostgreSQL project's apt
# repository. Build from the repository root:
#   docker build -f deploy/docker/strata-postgres.Dockerfile --build-arg PG_VERSION=15 \
#       -t ghcr.io/strata-storage/postgres:15 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p strata-operator --bin strata-instance

FROM debian:bookworm-slim
ARG PG_VERSION=15
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-common ca-certificates \
    && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
    && apt-get install -y --no-install-recommends "postgresql-${PG_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && test "$(id -u postgres)" = 999 \
    && test -x "/usr/lib/postgresql/${PG_VERSION}/bin/postgres"
COPY --from=build /src/target/release/strata-instance /usr/local/bin/strata-instance
ENTRYPOINT ["/usr/local/bin/strata-instance"]
