# The controller image: `docker build -t REGISTRY/backstop:TAG .` then
# `docker push REGISTRY/backstop:TAG`, and point flux/deployment.yaml at it.
# Build stage: a release build of the one binary (clang for the PostgreSQL
# parser, OpenSSL for TLS).
FROM rust:1.95-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends clang libclang-dev libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin backstop

# Runtime: the PostgreSQL client tools `dump` checkpoints and the restore
# drill use (pg_dump, pg_restore, pg_basebackup), git for repacking the
# mirror, CA roots for TLS; non-root user 65532 as the Deployment expects.
FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        postgresql-client ca-certificates git libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --no-create-home --home-dir /var/lib/backstop backstop
COPY --from=build /src/target/release/backstop /usr/local/bin/backstop
USER 65532:65532
ENV BACKSTOP_STATE=/var/lib/backstop
ENTRYPOINT ["/usr/local/bin/backstop"]
CMD ["controller"]
