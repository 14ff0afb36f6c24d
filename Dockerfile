# cuttle container image: a static musl build on distroless, non-root, no shell.
#
#   make release                      # build with version labels and start it (see Makefile)
#   docker build -t cuttle .          # or by hand
#
# The build runs the same cargo command as a local `cargo build --release`, with the musl target
# so that the binary is static and needs nothing from the runtime image.

# ---------------------------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------------------------
FROM rust:1.95.0-bookworm AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG TARGET=x86_64-unknown-linux-musl

# musl-tools: the musl C toolchain, for any dependency that compiles C.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "${TARGET}"

WORKDIR /build

# Dependency layer: build every dependency against stub sources, so that a change to the
# sources alone does not rebuild the dependencies. Cargo refuses a manifest whose declared
# targets have no file, so every [[bin]], [[test]], [[bench]] and [[example]] gets a stub.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && awk -F'"' ' \
        function emit() { if (dir != "" && name != "") print (path != "" ? path : dir "/" name ".rs") } \
        /^\[/ { emit(); dir = ""; name = ""; path = "" } \
        /^\[\[bin\]\]/ { dir = "src/bin" } \
        /^\[\[test\]\]/ { dir = "tests" } \
        /^\[\[bench\]\]/ { dir = "benches" } \
        /^\[\[example\]\]/ { dir = "examples" } \
        dir != "" && /^name *=/ { name = $2 } \
        dir != "" && /^path *=/ { path = $2 } \
        END { emit() }' Cargo.toml \
    | while IFS= read -r stub; do \
        if [ ! -e "${stub}" ]; then mkdir -p "$(dirname "${stub}")" && echo 'fn main() {}' > "${stub}"; fi; \
      done \
    && cargo build --release --locked --target "${TARGET}" \
    && rm -rf src

# The real sources. Touch them so that cargo rebuilds the crate over the stub build whatever
# the modification times in the build context.
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --target "${TARGET}" \
    && cp "target/${TARGET}/release/cuttle" /cuttle \
    && /cuttle --version

# ---------------------------------------------------------------------------------------------
# Runtime stage: distroless static, nonroot user (65532), no shell, no package manager.
# ---------------------------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot

ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=""

LABEL org.opencontainers.image.title="cuttle" \
      org.opencontainers.image.description="Allowlisting egress forward proxy for AWS VPCs, a drop-in replacement for the Squid egress image" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

COPY --from=build /cuttle /usr/local/bin/cuttle

ENV CUTTLE_LISTEN=0.0.0.0:3128

USER 65532:65532

EXPOSE 3128

# SIGTERM starts the drain: /healthz turns 503, in-flight requests and tunnels get
# SHUTDOWN_LIFETIME seconds (default 20), then the process exits 0.
STOPSIGNAL SIGTERM

# The image has no shell or curl: cuttle probes its own /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/cuttle", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/cuttle"]
