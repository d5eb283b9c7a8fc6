# The optout service as a container image: built in a Rust image, shipped as the binary alone on a
# distroless base (glibc and CA certificates, no shell, no package manager), as a non-root user.
#
#   docker build -t optout-service:0.1.0 .
#
# Not built in CI (no container engine runs there); the Helm chart that runs it is rendered and
# validated by scripts/test.sh.

# Same toolchain as development (rustc 1.95); pin by digest in a release pipeline.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so editing the service does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
COPY proto proto
RUN mkdir -p src loadtest/src benches examples \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs && touch loadtest/src/lib.rs \
    && echo 'fn main() {}' > benches/core.rs && echo 'fn main() {}' > examples/redis_scale.rs \
    && cargo build --release --locked -p optout --bin optout \
    && rm -rf src loadtest/src
COPY src src
COPY loadtest/src loadtest/src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p optout --bin optout

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/optout /usr/local/bin/optout
# 65532 is distroless's "nonroot"; the chart runs it with a read-only root filesystem.
USER 65532:65532
# gRPC (TLS), plaintext health (grpc.health.v1 only), Prometheus metrics.
EXPOSE 50051 50052 9090
ENTRYPOINT ["/usr/local/bin/optout"]
CMD ["serve", "--listen=0.0.0.0:50051", "--health-listen=0.0.0.0:50052", "--metrics-listen=0.0.0.0:9090", "--log-format=json"]
