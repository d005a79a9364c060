# syntax=docker/dockerfile:1
#
# A one-shot job: `docker run --rm IMAGE [OPTIONS] URL...`, logs on stderr,
# results on stdout (add `--format json` for JSON Lines).
#
#   docker build -t classifier .
#   docker run --rm classifier --format json https://example.org/bird.jpg
#
# The runtime stage copies the binary and CA certificates from the stage
# named by SOURCE: `build` (default) compiles them on the official Rust
# image; `local` takes them from dist/ in the build context, for machines
# that build the binary themselves (see .ci/container-smoke):
#
#   cargo build --release --target x86_64-unknown-linux-musl   (needs musl-tools)
#   mkdir -p dist && cp target/x86_64-unknown-linux-musl/release/classifier dist/
#   strip dist/classifier
#   cp /etc/ssl/certs/ca-certificates.crt dist/
#   docker build --build-arg SOURCE=local -t classifier .

ARG SOURCE=build

FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
# A static musl binary: no glibc, no NSS (musl resolves DNS from
# /etc/resolv.conf and /etc/hosts by itself), no OpenSSL (rustls).
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
 && mkdir -p /dist \
 && cp target/x86_64-unknown-linux-musl/release/classifier /dist/ \
 && strip /dist/classifier \
 && cp /etc/ssl/certs/ca-certificates.crt /dist/

FROM scratch AS local
COPY dist/classifier dist/ca-certificates.crt /dist/

FROM ${SOURCE} AS binary

FROM scratch
COPY --from=binary /dist/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=binary /dist/classifier /classifier
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# nobody: the job needs no privilege, and no file system of its own.
USER 65534:65534
ENTRYPOINT ["/classifier"]
