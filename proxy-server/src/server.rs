//! Binding every listener, then running the agent service, the frontend and
//! the health endpoint until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use konnectivity_kube::lease;
use konnectivity_kube::token_review::TokenReviewer;
use konnectivity_proto::grpc::{GrpcService, MAX_FRAME, MAX_HEADER_LIST};
use konnectivity_runtime::admin::{self, AdminState};
use konnectivity_runtime::shutdown::Shutdown;
use konnectivity_runtime::tls;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::backend::agent::LinkSettings;
use crate::backend::auth::AgentAuth;
use crate::backend::quic;
use crate::backend::registry::AgentRegistry;
use crate::backend::service::AgentEndpoint;
use crate::config::{Config, FrontendListen, Mode};
use crate::diagnostics;
use crate::frontend::grpc::GrpcFrontend;
use crate::frontend::http_connect;
use crate::listen;
use crate::metrics::Metrics;

/// Largest gRPC message accepted (the Go client writes one `DATA` per call,
/// up to gRPC's 4 MiB default; leave room above it).
const MAX_MESSAGE: usize = 16 << 20;
/// HTTP/2 receive windows. The 64 KiB protocol default caps one stream at a
/// window per round trip; these let one connection fill the link.
const STREAM_WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 16 << 20;
/// Streams a gRPC frontend connection may reset before the server accepted
/// them (as many as one agent stream's pending dials).
const FRONTEND_MAX_PENDING_RESETS: usize = 1024;

/// Where the frontend listens, once bound.
#[derive(Debug, Clone)]
pub enum FrontendAddr {
    /// Unix socket path.
    Unix(PathBuf),
    /// TCP address.
    Tcp(SocketAddr),
}

enum FrontendListener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, Arc<tls::Reloading<rustls::ServerConfig>>),
}

/// A server whose listeners are bound; [`BoundServer::run`] serves them.
pub struct BoundServer {
    config: Config,
    frontend: FrontendListener,
    agent: TcpListener,
    agent_tls: Arc<tls::Reloading<rustls::ServerConfig>>,
    /// The agents' QUIC endpoint, when offered.
    agent_quic: Option<quinn::Endpoint>,
    health: TcpListener,
    admin: Option<TcpListener>,
    metrics: Metrics,
    auth: AgentAuth,
    kube: Option<konnectivity_kube::Client>,
}

impl BoundServer {
    /// The bound frontend address.
    pub fn frontend_addr(&self) -> FrontendAddr {
        match &self.frontend {
            FrontendListener::Unix(_, p) => FrontendAddr::Unix(p.clone()),
            FrontendListener::Tcp(l, _) => FrontendAddr::Tcp(l.local_addr().expect("bound")),
        }
    }
    /// The bound agent listener address.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent.local_addr().expect("bound")
    }
    /// The bound UDP address of the agents' QUIC endpoint, when offered.
    pub fn agent_quic_addr(&self) -> Option<SocketAddr> {
        self.agent_quic.as_ref().and_then(|e| e.local_addr().ok())
    }
    /// The bound health listener address.
    pub fn health_addr(&self) -> SocketAddr {
        self.health.local_addr().expect("bound")
    }

    /// The bound admin listener address, when it is not the health one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }
    /// The server's metrics (tests read them directly).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }
}

async fn tcp(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} listener on {addr}"))
}

/// Binds a Unix socket at `path` with permissions `mode`, never visible with
/// others: it is bound under a temporary name beside `path`, given its mode,
/// then renamed into place (so no client can connect while the umask's mode
/// applies).
fn bind_unix(path: &std::path::Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "the file exists (--delete-existing-uds-file=false)",
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Binds every listener of `config`. Fails before anything is served.
pub async fn bind(config: Config) -> anyhow::Result<BoundServer> {
    let agent_tls = tls::Reloading::server("agent listener", &config.agent_tls, &[b"h2"])
        .context("agent TLS")?;
    let frontend = match &config.frontend {
        FrontendListen::Unix {
            path,
            delete_existing,
            mode,
        } => {
            if *delete_existing && path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("remove existing socket {}", path.display()))?;
            }
            let l = bind_unix(path, *mode)
                .with_context(|| format!("bind frontend Unix socket {}", path.display()))?;
            FrontendListener::Unix(l, path.clone())
        }
        FrontendListen::Tcp { addr, tls: files } => {
            let alpn: &[&[u8]] = match config.mode {
                Mode::Grpc => &[b"h2"],
                Mode::HttpConnect => &[b"http/1.1"],
            };
            let cfg =
                tls::Reloading::server("frontend listener", files, alpn).context("frontend TLS")?;
            FrontendListener::Tcp(tcp(addr, "frontend").await?, cfg)
        }
    };
    let agent = tcp(&config.agent_addr, "agent").await?;
    let agent_quic = match config.agent_quic {
        Some(port) => Some(bind_quic(&agent, port, &agent_tls)?),
        None => None,
    };
    let health = tcp(&config.health_addr, "health").await?;
    let admin = match &config.admin_addr {
        Some(a) => Some(tcp(a, "admin").await?),
        None => None,
    };
    let kube = if config.kube.needed() {
        let client = konnectivity_kube::client(config.kube.kubeconfig.as_deref()).await?;
        Some(client)
    } else {
        None
    };
    let auth = match (&config.kube.token_review, &config.tokens, &kube) {
        (Some(want), _, Some(client)) => AgentAuth::TokenReview(Arc::new(TokenReviewer::new(
            client.clone(),
            want.clone(),
            config.kube.review_timeout,
        ))),
        (_, Some(file), _) => AgentAuth::TokenFile(file.clone()),
        _ => AgentAuth::None,
    };
    Ok(BoundServer {
        config,
        frontend,
        agent,
        agent_tls,
        agent_quic,
        health,
        admin,
        metrics: Metrics::new(),
        auth,
        kube,
    })
}

/// Binds the agents' QUIC endpoint on the agent listener's address: on
/// `port`, or else on the agent port's number (another free port if that
/// number is taken for UDP, which the offer to agents names).
fn bind_quic(
    agent: &TcpListener,
    port: Option<u16>,
    tls: &tls::Reloading<rustls::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    let tcp = agent.local_addr()?;
    let at = |port| SocketAddr::new(tcp.ip(), port);
    let bound = match port {
        Some(p) => quic::bind(at(p), tls),
        None => quic::bind(at(tcp.port()), tls).or_else(|e| {
            tracing::warn!(error = %e, port = tcp.port(), "UDP port of the agent port's number taken; QUIC for agents on another port");
            quic::bind(at(0), tls)
        }),
    };
    bound.with_context(|| format!("bind agent QUIC endpoint (UDP) on {}", tcp.ip()))
}

/// Binds and runs until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}

impl BoundServer {
    /// Serves until `shutdown`: on the graceful signal the frontend stops
    /// accepting and open connections get `--grace-period` to finish; then
    /// everything stops.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let cfg = &self.config;
        let metrics = self.metrics.clone();
        let mode = match cfg.mode {
            Mode::Grpc => "grpc",
            Mode::HttpConnect => "http-connect",
        };
        info!(
            version = env!("CARGO_PKG_VERSION"),
            server.id = %cfg.server_id,
            mode,
            frontend = ?self.frontend_addr(),
            agent = %self.agent_addr(),
            agent_quic = ?self.agent_quic_addr(),
            health = %self.health_addr(),
            admin = ?self.admin.as_ref().and_then(|a| a.local_addr().ok()),
            "proxy-server started"
        );
        let registry = Arc::new(
            AgentRegistry::new(cfg.strategies.clone(), cfg.dial_timeout, metrics.clone())
                .with_policy(cfg.policy.clone()),
        );
        let stop_all = shutdown.immediate.clone();

        // The server Lease lives until the first signal: draining servers
        // stop counting.
        let lease_stop = shutdown.graceful.child_token();
        let lease_task = match (&cfg.kube.leases, &self.kube) {
            (Some((namespace, labels)), Some(client)) => Some(tokio::spawn(lease::publish(
                client.clone(),
                lease::PublishSettings {
                    namespace: namespace.clone(),
                    labels: labels.clone(),
                    server_id: cfg.server_id.clone(),
                },
                lease_stop.clone(),
            ))),
            _ => None,
        };

        // Health and admin endpoints.
        let ready_registry = registry.clone();
        let state = AdminState {
            registry: Arc::new(metrics.registry.clone()),
            ready: Arc::new(move || {
                if ready_registry.is_empty() {
                    Err("no connection to any proxy agent".into())
                } else {
                    Ok(())
                }
            }),
            debug: None,
        };
        let debug_registry = registry.clone();
        let server_id = cfg.server_id.clone();
        let debug: admin::DebugFn = Arc::new(move |path, query| {
            diagnostics::render(&debug_registry, &server_id, path, query)
                .map(|r| r.map(|v| v.to_string()))
        });
        admin::spawn(self.health, self.admin, state, debug, stop_all.clone());
        let open = metrics.established_connections.clone();
        tokio::spawn(konnectivity_runtime::memory::trim_after_bursts(
            move || open.get(),
            stop_all.clone(),
        ));

        // Agent listener.
        let endpoint = AgentEndpoint {
            registry: registry.clone(),
            settings: LinkSettings {
                metrics: metrics.clone(),
                stall_timeout: cfg.stall_timeout,
                max_pending: cfg.max_pending,
                max_conns: cfg.max_conns,
                held: konnectivity_relay::Held::new(cfg.max_buffered),
            },
            server_id: cfg.server_id.clone(),
            server_count: cfg.server_count,
            auth: self.auth.clone(),
            flow_control: cfg.flow_control,
            quic_port: self
                .agent_quic
                .as_ref()
                .and_then(|e| e.local_addr().ok())
                .map(|a| a.port()),
            stop: stop_all.clone(),
        };
        if let Some(endpoint) = self.agent_quic {
            tokio::spawn(quic::serve(
                endpoint,
                self.agent_tls.clone(),
                registry.clone(),
                metrics.clone(),
                stop_all.clone(),
            ));
        }
        let refusals = registry.clone();
        let on_refused: listen::OnRefused = Arc::new(move |peer, why| {
            refusals
                .events()
                .agent_refused(&peer.to_string(), None, "tls", why)
        });
        let agent_incoming = listen::tls_incoming(
            self.agent,
            self.agent_tls,
            "agent",
            stop_all.clone(),
            Some(on_refused),
        );
        let agent_server = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONN_WINDOW))
            .max_frame_size(Some(MAX_FRAME))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST as u32))
            .http2_keepalive_interval(Some(cfg.keepalive_time))
            .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
            .add_service(GrpcService::new(endpoint, MAX_MESSAGE))
            .serve_with_incoming_shutdown(
                watched(agent_incoming, "agent", metrics.clone(), |c| {
                    c.info().remote_addr.to_string()
                }),
                stop_all.clone().cancelled_owned(),
            );
        let agent_task = tokio::spawn(agent_server);

        // Frontend.
        let frontend_stop = shutdown.graceful.clone();
        let frontend_task = match (cfg.mode, self.frontend) {
            (Mode::Grpc, listener) => {
                let frontend = GrpcFrontend {
                    registry: registry.clone(),
                    metrics: metrics.clone(),
                    stop: stop_all.clone(),
                };
                let svc = GrpcService::new(frontend, MAX_MESSAGE);
                let builder = tonic::transport::Server::builder()
                    .initial_stream_window_size(Some(STREAM_WINDOW))
                    .initial_connection_window_size(Some(CONN_WINDOW))
                    .max_frame_size(Some(MAX_FRAME))
                    .http2_max_header_list_size(Some(MAX_HEADER_LIST as u32))
                    .http2_keepalive_interval(Some(cfg.frontend_keepalive_time))
                    // A reusable tunnel (konnectivity-client v0.37) carries
                    // every dial as a stream of one connection; when a burst
                    // of requests is cancelled, more than h2's default of 20
                    // streams are reset before the server has accepted them,
                    // and h2 would close the whole connection with every
                    // open tunnel on it. Still bounded (rapid-reset abuse).
                    .http2_max_pending_accept_reset_streams(Some(FRONTEND_MAX_PENDING_RESETS));
                match listener {
                    FrontendListener::Unix(l, _) => {
                        let incoming = listen::unix_grpc_incoming(l, frontend_stop.clone());
                        let incoming =
                            watched(incoming, "frontend", metrics.clone(), |_| "unix".into());
                        let mut b = builder;
                        tokio::spawn(async move {
                            b.add_service(svc)
                                .serve_with_incoming_shutdown(
                                    incoming,
                                    frontend_stop.cancelled_owned(),
                                )
                                .await
                        })
                    }
                    FrontendListener::Tcp(l, tls_cfg) => {
                        let incoming = listen::tls_incoming(
                            l,
                            tls_cfg,
                            "frontend",
                            frontend_stop.clone(),
                            None,
                        );
                        let incoming = watched(incoming, "frontend", metrics.clone(), |c| {
                            c.info().remote_addr.to_string()
                        });
                        let mut b = builder;
                        tokio::spawn(async move {
                            b.add_service(svc)
                                .serve_with_incoming_shutdown(
                                    incoming,
                                    frontend_stop.cancelled_owned(),
                                )
                                .await
                        })
                    }
                }
            }
            (Mode::HttpConnect, FrontendListener::Unix(l, _)) => {
                let registry = registry.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    loop {
                        let (sock, _) = tokio::select! {
                            _ = frontend_stop.cancelled() => return Ok(()),
                            r = l.accept() => match r {
                                Ok(c) => c,
                                Err(e) => { listen::accept_backoff("frontend", &e).await; continue; }
                            },
                        };
                        let fut = http_connect::serve_conn(
                            sock,
                            "unix".into(),
                            registry.clone(),
                            metrics.clone(),
                        );
                        tokio::spawn(fut);
                    }
                })
            }
            (Mode::HttpConnect, FrontendListener::Tcp(l, tls_cfg)) => {
                let registry = registry.clone();
                let metrics = metrics.clone();
                let mut incoming =
                    listen::tls_incoming(l, tls_cfg, "frontend", frontend_stop.clone(), None);
                tokio::spawn(async move {
                    while let Some(Ok(conn)) = incoming.recv().await {
                        let peer = conn.info().remote_addr.to_string();
                        tokio::spawn(http_connect::serve_conn(
                            conn,
                            peer,
                            registry.clone(),
                            metrics.clone(),
                        ));
                    }
                    Ok(())
                })
            }
        };

        // Wait for the first signal, then the grace period.
        tokio::select! {
            _ = shutdown.graceful.cancelled() => {}
            r = agent_task => {
                shutdown.now();
                return r.context("agent listener task")?.context("agent listener");
            }
        }
        info!(grace_period = ?cfg.grace_period, "draining: frontend closed to new connections");
        if let Some(t) = lease_task {
            // Bounded: each API call of the publisher has its own deadline.
            let _ = t.await;
        }
        let deadline = tokio::time::Instant::now() + cfg.grace_period;
        loop {
            // A frontend connection may still be writing out what its
            // agent connection (already closed) delivered: wait for both.
            let frontends: i64 = ["grpc", "http-connect"]
                .iter()
                .map(|m| metrics.frontend_connections.with_label_values(&[m]).get())
                .sum();
            let open =
                metrics.established_connections.get() + metrics.pending_dials.get() + frontends;
            if open <= 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(open, "grace period over; cutting off open connections");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                _ = shutdown.immediate.cancelled() => {
                    warn!(open, "second signal; cutting off open connections");
                    break;
                }
            }
        }
        shutdown.now();
        frontend_task.abort();
        if let FrontendAddr::Unix(p) = self_frontend_path(&self.config) {
            let _ = std::fs::remove_file(p);
        }
        info!("proxy-server stopped");
        Ok(())
    }
}

/// Accepted connections, each wrapped so that an HTTP/2 error `GOAWAY` the
/// server sends on it is logged and counted ([`listen::Watched`]).
fn watched<S>(
    incoming: tokio::sync::mpsc::Receiver<Result<S, std::io::Error>>,
    listener: &'static str,
    metrics: Metrics,
    peer: impl Fn(&S) -> String + Send + 'static,
) -> impl futures::Stream<Item = Result<listen::Watched<S>, std::io::Error>> {
    use futures::StreamExt;
    ReceiverStream::new(incoming).map(move |r| {
        r.map(|conn| {
            let who = peer(&conn);
            listen::Watched::new(conn, listener, who, metrics.clone())
        })
    })
}

fn self_frontend_path(cfg: &Config) -> FrontendAddr {
    match &cfg.frontend {
        FrontendListen::Unix { path, .. } => FrontendAddr::Unix(path.clone()),
        FrontendListen::Tcp { .. } => FrontendAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))),
    }
}
