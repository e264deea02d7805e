# signoff container image.
#
#   docker build -t signoff:dev .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/my-config:/etc/signoff:ro" \
#     -e SIGNOFF_DATABASE_URL=postgres://signoff:...@db.example.internal/signoff \
#     signoff:dev
#
# The image ships no config: mount a directory holding signoff.toml (with
# listen = "0.0.0.0:8080") and its policy at /etc/signoff, as manifests/kubernetes does.
# Any other subcommand runs the same way, e.g. `docker run ... signoff:dev policy check /etc/signoff/policy.yaml`.

# ---- build ---------------------------------------------------------------------------
# Pin a toolchain with --build-arg RUST_VERSION=1.xx (Cargo.toml's rust-version is the floor).
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# 1. Dependencies only, cached in this layer until Cargo.toml or Cargo.lock change:
#    build against stub sources, then forget everything built from the stubs. Every target
#    Cargo.toml names (the bench binary, the integration tests, the criterion bench) gets a
#    stub, or cargo refuses the manifest; only the server binary is built. The bench binary
#    and the crates only it uses need the `bench` feature, so none of them is built here.
#    .ci/docker-build replays these steps in CI: keep the two in step.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/signoff-bench tests/integration benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > src/bin/signoff-bench/main.rs \
 && echo 'fn main() {}' > tests/integration/main.rs \
 && echo 'fn main() {}' > benches/policy_evaluation.rs \
 && cargo build --release --locked --bin signoff \
 && rm -rf src \
           target/release/signoff target/release/signoff.d \
           target/release/deps/signoff-* target/release/deps/libsignoff-* \
           target/release/.fingerprint/signoff-*

# 2. The crate itself. migrations/ is embedded by sqlx::migrate! at compile time (build.rs
#    tells cargo to rebuild when they change). The touch makes sure cargo never mistakes
#    the copied sources for the stubs.
COPY build.rs ./
COPY src ./src
COPY migrations ./migrations
RUN touch build.rs src/main.rs src/lib.rs \
 && cargo build --release --locked --bin signoff \
 && install -D -m 0755 target/release/signoff /out/usr/local/bin/signoff \
 && mkdir -p /out/var/lib/signoff

# ---- runtime -------------------------------------------------------------------------
# glibc + libgcc only; TLS is rustls with built-in roots, so no OpenSSL is needed.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="signoff" \
      org.opencontainers.image.description="Approval gateway for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/usr/local/bin/signoff /usr/local/bin/signoff
# Working directory owned by the runtime user: a relative sqlite://signoff.db lands here
# (mount a volume on it to keep SQLite data). With PostgreSQL nothing is written locally.
COPY --from=builder --chown=65532:65532 /out/var/lib/signoff /var/lib/signoff
WORKDIR /var/lib/signoff

EXPOSE 8080
# The distroless "nonroot" user, given numerically so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
ENTRYPOINT ["signoff"]
CMD ["serve", "--config", "/etc/signoff/signoff.toml"]
