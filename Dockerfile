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
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --target x86_64-unknown-linux-gnu
#   mkdir -p dist && cp target/x86_64-unknown-linux-gnu/release/classifier dist/
#   strip dist/classifier
#   cp /etc/ssl/certs/ca-certificates.crt dist/
#   docker build --build-arg SOURCE=local -t classifier .

ARG SOURCE=build

FROM docker.io/library/rust:1.95-bookworm AS build
# libjpeg-turbo, built from the turbojpeg crate's bundled source, needs
# cmake, and nasm for its SIMD code.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# A static binary linked with glibc, not musl: musl's allocator maps every
# large block afresh, and the container ran at less than half the speed of
# the benchmarked build (BENCHMARKS.md). glibc 2.34 and later look names up
# in /etc/hosts and DNS with code built into libc, so the static binary
# needs no NSS modules in the image (the order is container/nsswitch.conf's);
# rustls needs no OpenSSL.
# The explicit --target keeps build scripts and proc-macros dynamic.
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && mkdir -p /dist \
 && cp target/x86_64-unknown-linux-gnu/release/classifier /dist/ \
 && strip /dist/classifier \
 && cp /etc/ssl/certs/ca-certificates.crt /dist/

FROM scratch AS local
COPY dist/classifier dist/ca-certificates.crt /dist/

FROM ${SOURCE} AS binary

FROM scratch
COPY --from=binary /dist/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=binary /dist/classifier /classifier
COPY container/nsswitch.conf /etc/nsswitch.conf
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# nobody: the job needs no privilege, and no file system of its own.
USER 65534:65534
ENTRYPOINT ["/classifier"]
