# Builds the outbox-relay and sample-app binaries (librdkafka and OpenSSL are
# linked statically). The image runs the relay unless told otherwise.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p outbox-toolkit-relay --bin outbox-relay -p sample-app --bin sample-app

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY --from=build /src/target/release/sample-app /usr/local/bin/sample-app
USER relay
EXPOSE 9464
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
