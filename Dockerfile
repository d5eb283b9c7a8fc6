# The optout service as a container image: built in a Rust image, shipped as the binary alone on a
# distroless base (glibc and CA certificates, no shell, no package manager), as a non-root user.
#
#   docker build --build-arg OPTOUT_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t optout-service:0.1.0 .
#
# Not built in CI (no container engine runs there); the Helm chart that runs it is rendered and
# validated by scripts/test.sh. docs/src/operations.md, "Running in a container", shows a `docker run` that starts.

# Same toolchain as development (rustc 1.95); pin by digest in a release pipeline.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# The workspace as it is (manifests, the proto crates and their build scripts, the service); the
# registry and the target directory are BuildKit caches, so a rebuild compiles only what changed.
# The dist profile: release with LTO, without symbols (Cargo.toml says what it measured).
COPY . .
# .git is not copied (.dockerignore): the commit `optout --version` and optout_build_info carry.
ARG OPTOUT_GIT_COMMIT=unknown
ENV OPTOUT_GIT_COMMIT=${OPTOUT_GIT_COMMIT}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p optout --bin optout \
    && cp target/dist/optout /optout \
    && mkdir -p /data

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="optout-service" \
      org.opencontainers.image.description="Online NHS opt-out enforcement: RELEASE or WITHHOLD for each NHS number of an extract, over gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /optout /usr/local/bin/optout
# The data directory, the non-root user's: a named volume mounted here starts with this owner
# (Docker copies it), so the embedded store can write to it. No shell here to chown at run time.
COPY --from=build --chown=65532:65532 /data /data
# 65532 is distroless's "nonroot"; the chart runs it with a read-only root filesystem.
USER 65532:65532
# gRPC (TLS), plaintext health (grpc.health.v1 only), Prometheus metrics.
EXPOSE 50051 50052 9090
# The image has no shell: the binary asks its own health port (exit 0 when SERVING).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/optout", "health", "--server", "http://127.0.0.1:50052", "--timeout", "2s"]
ENTRYPOINT ["/usr/local/bin/optout"]
# The default: development mode, to try it (`docker run -p 50051:50051 optout-service`): every
# interface, no keys or TLS, a temporary store, a banner saying so; refused inside Kubernetes.
# For real use give the command: beyond loopback the service requires keys, TLS and an audit key
# (docs/src/operations.md, "Running in a container"; the Helm chart passes its own arguments).
CMD ["serve", "--dev", "--health-listen=127.0.0.1:50052", "--metrics-listen=0.0.0.0:9090"]
