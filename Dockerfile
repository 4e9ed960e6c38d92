# Builds the outbox-relay binary (librdkafka and OpenSSL are linked statically).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p outbox-relay --bin outbox-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
USER relay
EXPOSE 9464
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
