# Images for proxy-server and proxy-agent:
#   docker build --target proxy-server -t konnectivity-rs/proxy-server:0.1.0 .
#   docker build --target proxy-agent  -t konnectivity-rs/proxy-agent:0.1.0 .
# Each image holds one binary at / (the manifests' `command`) and the C
# libraries it links (rustls with ring: no OpenSSL), nothing else: no shell,
# no package manager. It runs as a non-root user.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p proxy-server -p proxy-agent \
 && mkdir -p /out/lib/x86_64-linux-gnu /out/lib64 \
 && cp target/release/proxy-server target/release/proxy-agent /out/ \
 && for lib in $(ldd /out/proxy-server /out/proxy-agent | awk '/=>/ {print $3}' | sort -u); do \
      cp "$lib" /out/lib/x86_64-linux-gnu/; \
    done \
 && cp /lib64/ld-linux-x86-64.so.2 /out/lib64/

FROM scratch AS runtime
COPY --from=build /out/lib /lib
COPY --from=build /out/lib64 /lib64
USER 65532:65532

FROM runtime AS proxy-server
COPY --from=build /out/proxy-server /proxy-server
ENTRYPOINT ["/proxy-server"]

FROM runtime AS proxy-agent
COPY --from=build /out/proxy-agent /proxy-agent
ENTRYPOINT ["/proxy-agent"]
