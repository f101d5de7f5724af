# syntax=docker/dockerfile:1
#
# outbox-relay container image.
#   docker build -t outbox-relay .
#   docker run --rm -e OUTBOX_RELAY_DATABASE_URL=... -e OUTBOX_RELAY_KAFKA_BROKERS=... outbox-relay
#
# Rust version: the locked dependency graph needs rustc >= 1.88 (sha2 0.11 via
# postgres-protocol; tokio/clap need 1.85), so rust:1.85 would fail under --locked.
# Bump RUST_VERSION when Cargo.lock moves past it.
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS builder
# librdkafka is compiled from source by the rdkafka crate (bundled, no system
# librdkafka): its configure/make needs a C/C++ toolchain, make and perl; zlib for the
# `libz` feature. The rust image already carries most of these; installing them
# explicitly keeps the build working if the base image slims down.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential make perl pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Build the dependencies in their own layer, keyed only on the manifests, so editing
# src/ does not recompile librdkafka and the rest of the dependency graph.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
# touch: make sure cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -m 0755 target/release/outbox-relay /usr/local/bin/outbox-relay

FROM debian:bookworm-slim AS runtime
# ca-certificates: for TLS to managed Postgres/Kafka endpoints.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The relay needs no privileges inside the container.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --shell /usr/sbin/nologin relay

COPY --from=builder /usr/local/bin/outbox-relay /usr/local/bin/outbox-relay

USER 10001:10001
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
