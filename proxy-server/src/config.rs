//! Command-line flags (upstream names, `--name=value`) and the validated
//! [`Config`] built from them. Every check happens here, before any port is
//! bound, so a bad flag or an unreadable certificate exits with one line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use konnectivity_kube::lease;
use konnectivity_kube::token_review::Expected;
use konnectivity_proto::policy::Destinations;
use konnectivity_runtime::addr::listen_addr;
use konnectivity_runtime::flag::go_bool;
use konnectivity_runtime::{duration, logging, tls};

use crate::backend::auth::TokenFile;
use crate::backend::registry::DestinationPolicy;
use crate::backend::strategy::Strategy;

/// Flags of `proxy-server`.
#[derive(Debug, Parser)]
#[command(
    name = "proxy-server",
    version,
    about = "Konnectivity proxy server (Rust)",
    args_override_self = true
)]
pub struct Args {
    /// Frontend protocol: grpc or http-connect.
    #[arg(long, default_value = "grpc")]
    pub mode: String,
    /// Unix socket for the frontend (kube-apiserver). When set, the TCP
    /// frontend on --server-port is not started.
    #[arg(long, default_value = "")]
    pub uds_name: String,
    /// Remove a stale file at --uds-name before listening (upstream default: true).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub delete_existing_uds_file: bool,
    /// Permissions of the --uds-name socket, in octal. Whoever can write to
    /// the socket can open connections into every node, so the default lets
    /// only the server's own user (and root) connect.
    #[arg(long, default_value = "0600")]
    pub uds_mode: String,
    /// Frontend TCP port (mutual TLS), used when --uds-name is empty.
    #[arg(long, default_value_t = 8090)]
    pub server_port: u16,
    /// Address the frontend TCP listener binds.
    #[arg(long, default_value = "")]
    pub server_bind_address: String,
    /// Frontend TLS certificate.
    #[arg(long, default_value = "")]
    pub server_cert: String,
    /// Frontend TLS key.
    #[arg(long, default_value = "")]
    pub server_key: String,
    /// CA that frontend client certificates must chain to.
    #[arg(long, default_value = "")]
    pub server_ca_cert: String,
    /// Agent listener port (TLS).
    #[arg(long, default_value_t = 8091)]
    pub agent_port: u16,
    /// Address the agent listener binds.
    #[arg(long, default_value = "")]
    pub agent_bind_address: String,
    /// Offer QUIC to agents that speak it (our own): their connections then
    /// each get a QUIC stream of their own, on UDP --agent-quic-port.
    /// Reference agents never see the offer.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enable_agent_quic: bool,
    /// UDP port of the agents' QUIC endpoint, on --agent-bind-address.
    /// Default: the agent port's number (the TCP port actually bound).
    #[arg(long)]
    pub agent_quic_port: Option<u16>,
    /// Agent-facing TLS certificate.
    #[arg(long, default_value = "")]
    pub cluster_cert: String,
    /// Agent-facing TLS key.
    #[arg(long, default_value = "")]
    pub cluster_key: String,
    /// CA for agent client certificates; when set, agents must present one.
    #[arg(long, default_value = "")]
    pub cluster_ca_cert: String,
    /// Health port: /healthz, /readyz, /metrics.
    #[arg(long, default_value_t = 8092)]
    pub health_port: u16,
    /// Address the health and admin listeners bind.
    #[arg(long, default_value = "")]
    pub health_bind_address: String,
    /// Admin port: also serves /metrics (and the health paths).
    #[arg(long, default_value_t = 8095)]
    pub admin_port: u16,
    /// Address the admin listener binds.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    /// This server's id, sent to agents. Empty = a random id.
    #[arg(long, default_value = "")]
    pub server_id: String,
    /// How many proxy servers agents should connect to.
    #[arg(long, default_value_t = 1)]
    pub server_count: u32,
    /// Ordered agent selection strategies: default, destHost, defaultRoute.
    #[arg(long, default_value = "default")]
    pub proxy_strategies: String,
    /// Address ranges and ports dials may reach through any agent,
    /// comma-separated (`10.0.0.0/8:10250,*:443`). Checked on the address as
    /// the frontend gave it: a name only matches `*` entries. Empty: any.
    #[arg(long, default_value = "")]
    pub allowed_destinations: String,
    /// `AGENT_ID=LIST`: the allowed destinations for one agent, instead of
    /// --allowed-destinations. Repeatable.
    #[arg(long)]
    pub agent_allowed_destinations: Vec<String>,
    /// HTTP/2 ping interval towards agents (dead-agent detection).
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub keepalive_time: Duration,
    /// How long to wait for a ping answer before dropping an agent stream.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub keepalive_timeout: Duration,
    /// HTTP/2 ping interval towards gRPC frontends.
    #[arg(long, default_value = "1h", value_parser = duration::parse)]
    pub frontend_keepalive_time: Duration,
    /// File of accepted agent bearer tokens, one per line (re-read on every
    /// agent connect). Empty = no token check.
    #[arg(long, default_value = "")]
    pub agent_tokens_file: String,
    /// Longest wait for an agent's DIAL_RSP before failing the dial.
    #[arg(long, default_value = "30s", value_parser = duration::parse)]
    pub dial_timeout: Duration,
    /// Pending dials allowed per agent stream.
    #[arg(long, default_value_t = 1024)]
    pub max_pending_dials_per_agent: usize,
    /// Established connections allowed per agent stream.
    #[arg(long, default_value_t = 65536)]
    pub max_connections_per_agent: usize,
    /// How long one connection's full queue may hold up its agent stream
    /// before only that connection is closed.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub stall_timeout: Duration,
    /// Bytes from agents the server may hold, over all connections, for
    /// frontends that have not read them yet. At the limit, a connection
    /// whose frontend is behind is closed when more arrives for it. 0: no
    /// limit.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_buffered_bytes: usize,
    /// Grace period for open connections after the first shutdown signal
    /// (upstream's name `--graceful-shutdown-timeout` is accepted too).
    #[arg(long, alias = "graceful-shutdown-timeout", default_value = "30s", value_parser = duration::parse)]
    pub grace_period: Duration,
    /// Negotiate per-connection flow control with agents that offer it.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub flow_control: bool,
    /// Logging (`--log-format`, klog's `--v`, `--logtostderr`, `--alsologtostderr`).
    #[command(flatten)]
    pub log: logging::LogArgs,
    /// Accepted for compatibility; profiling is not served.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub enable_profiling: Option<String>,
    /// Accepted for compatibility; rustls' safe defaults are used.
    #[arg(long, default_value = "", hide = true)]
    pub cipher_suites: String,
    /// Accepted for compatibility; TLS 1.2 and 1.3 are offered.
    #[arg(long, default_value = "", hide = true)]
    pub tls_min_version: String,
    /// Accepted for compatibility; queues are sized per connection here.
    #[arg(long, default_value = "10", hide = true)]
    pub xfr_channel_size: String,
    /// Accepted for compatibility.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub warn_on_channel_limit: Option<String>,
    /// Accepted for compatibility; profiling is not served.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub enable_contention_profiling: Option<String>,
    /// Accepted for compatibility (see --dial-timeout).
    #[arg(long, default_value = "", hide = true)]
    pub backend_dial_timeout: String,
    /// Publish this server's Lease, renew it, and delete expired ones, so
    /// agents with --count-server-leases know how many servers there are.
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true")]
    pub enable_lease_controller: bool,
    /// Namespace of the server Leases.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Labels of the server Leases (`k=v,k2=v2`).
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    /// Accepted for compatibility; the client is not rate limited here.
    #[arg(long, default_value = "", hide = true)]
    pub kubeconfig_qps: String,
    /// Accepted for compatibility; the client is not rate limited here.
    #[arg(long, default_value = "", hide = true)]
    pub kubeconfig_burst: String,
    /// Accepted for compatibility; JSON is used.
    #[arg(long, default_value = "", hide = true)]
    pub kube_api_content_type: String,
    /// Namespace of the agents' service account. With --agent-service-account
    /// and --authentication-audience, agents authenticate by service-account
    /// token (TokenReview).
    #[arg(long, default_value = "")]
    pub agent_namespace: String,
    /// The agents' service account.
    #[arg(long, default_value = "")]
    pub agent_service_account: String,
    /// Audience agent tokens must be issued for.
    #[arg(long, default_value = "")]
    pub authentication_audience: String,
    /// Longest wait for one TokenReview answer before the agent is refused.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub authentication_timeout: Duration,
    /// Kubeconfig for TokenReview and Leases. Empty = the in-cluster config.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
}

/// Frontend protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `ProxyService` over gRPC.
    Grpc,
    /// HTTP/1.1 CONNECT.
    HttpConnect,
}

/// Where the frontend listens.
#[derive(Debug, Clone)]
pub enum FrontendListen {
    /// A Unix socket (no TLS: file permissions guard it).
    Unix {
        /// Socket path.
        path: PathBuf,
        /// Remove an existing file first.
        delete_existing: bool,
        /// File permissions of the socket.
        mode: u32,
    },
    /// TCP with mandatory client certificates.
    Tcp {
        /// Bind address.
        addr: String,
        /// TLS identity and client CA.
        tls: tls::ServerTlsFiles,
    },
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Frontend protocol.
    pub mode: Mode,
    /// Frontend listener.
    pub frontend: FrontendListen,
    /// Agent listener bind address (`host:port`).
    pub agent_addr: String,
    /// Agent-facing TLS.
    pub agent_tls: tls::ServerTlsFiles,
    /// Health listener (`host:port`).
    pub health_addr: String,
    /// Admin listener (`host:port`), `None` when it equals the health one.
    pub admin_addr: Option<String>,
    /// Server id.
    pub server_id: String,
    /// Server count announced to agents.
    pub server_count: u32,
    /// Agent selection.
    pub strategies: Vec<Strategy>,
    /// Where dials may go, per agent.
    pub policy: DestinationPolicy,
    /// Ping interval towards agents.
    pub keepalive_time: Duration,
    /// Ping answer timeout.
    pub keepalive_timeout: Duration,
    /// Ping interval towards gRPC frontends.
    pub frontend_keepalive_time: Duration,
    /// Accepted agent tokens.
    pub tokens: Option<Arc<TokenFile>>,
    /// Pending-dial timeout.
    pub dial_timeout: Duration,
    /// Pending dials per agent stream.
    pub max_pending: usize,
    /// Connections per agent stream.
    pub max_conns: usize,
    /// Stall timeout.
    pub stall_timeout: Duration,
    /// `--max-buffered-bytes` (0: none).
    pub max_buffered: usize,
    /// Shutdown grace period.
    pub grace_period: Duration,
    /// Offer flow control.
    pub flow_control: bool,
    /// Offer QUIC to agents, on this UDP port (`None`: the agent port's
    /// number); `None` when not offered.
    pub agent_quic: Option<Option<u16>>,
    /// Kubernetes API use (TokenReview, Leases).
    pub kube: KubeUse,
}

/// What the server asks kube-apiserver for.
#[derive(Debug, Clone, Default)]
pub struct KubeUse {
    /// `--kubeconfig`; `None` = in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Agents must present a token for this service account and audience.
    pub token_review: Option<Expected>,
    /// Deadline of one review.
    pub review_timeout: Duration,
    /// Publish a Lease here with these labels.
    pub leases: Option<(String, BTreeMap<String, String>)>,
}

impl KubeUse {
    /// Whether a client is needed at all.
    pub fn needed(&self) -> bool {
        self.token_review.is_some() || self.leases.is_some()
    }
}

fn opt_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl Config {
    /// Validates flags, reading certificates and keys once to fail early.
    pub fn from_args(a: Args) -> anyhow::Result<Self> {
        use anyhow::{bail, Context};
        let token_review = match (
            a.agent_namespace.as_str(),
            a.agent_service_account.as_str(),
            a.authentication_audience.as_str(),
        ) {
            ("", "", "") => None,
            ("", _, _) => {
                bail!("--agent-namespace cannot be empty when agent authentication is enabled")
            }
            (_, "", _) => bail!(
                "--agent-service-account cannot be empty when agent authentication is enabled"
            ),
            (_, _, "") => bail!(
                "--authentication-audience cannot be empty when agent authentication is enabled"
            ),
            (ns, sa, aud) => Some(Expected {
                namespace: ns.into(),
                service_account: sa.into(),
                audience: aud.into(),
            }),
        };
        if token_review.is_some() && !a.agent_tokens_file.is_empty() {
            bail!("--agent-tokens-file and service-account token authentication (--agent-namespace...) exclude each other: choose one token check");
        }
        if a.authentication_timeout.is_zero() {
            bail!("--authentication-timeout must be positive");
        }
        let leases = if a.enable_lease_controller {
            let labels = lease::parse_labels(&a.lease_label)
                .map_err(|e| anyhow::anyhow!("--lease-label={}: {e}", a.lease_label))?;
            if a.lease_namespace.is_empty() {
                bail!("--lease-namespace cannot be empty with --enable-lease-controller");
            }
            Some((a.lease_namespace.clone(), labels))
        } else {
            None
        };
        let kubeconfig = opt_path(&a.kubeconfig);
        if let Some(p) = &kubeconfig {
            std::fs::metadata(p).with_context(|| format!("--kubeconfig {}", p.display()))?;
        }
        let kube = KubeUse {
            kubeconfig,
            token_review,
            review_timeout: a.authentication_timeout,
            leases,
        };
        let mode = match a.mode.as_str() {
            "grpc" => Mode::Grpc,
            "http-connect" => Mode::HttpConnect,
            m => bail!("--mode={m}: want grpc or http-connect"),
        };
        let frontend = if !a.uds_name.is_empty() {
            let mode = u32::from_str_radix(a.uds_mode.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .with_context(|| {
                    format!(
                        "--uds-mode={}: want octal permissions such as 0600 or 0660",
                        a.uds_mode
                    )
                })?;
            FrontendListen::Unix {
                path: PathBuf::from(&a.uds_name),
                delete_existing: a.delete_existing_uds_file,
                mode,
            }
        } else {
            let (Some(cert), Some(key), Some(ca)) = (
                opt_path(&a.server_cert),
                opt_path(&a.server_key),
                opt_path(&a.server_ca_cert),
            ) else {
                bail!("the TCP frontend (no --uds-name) needs --server-cert, --server-key and --server-ca-cert (mutual TLS)");
            };
            let files = tls::ServerTlsFiles {
                cert,
                key,
                client_ca: Some(ca),
            };
            tls::server_config(&files, &[b"h2", b"http/1.1"]).context("frontend TLS")?;
            FrontendListen::Tcp {
                addr: listen_addr(&a.server_bind_address, a.server_port),
                tls: files,
            }
        };
        let (Some(cert), Some(key)) = (opt_path(&a.cluster_cert), opt_path(&a.cluster_key)) else {
            bail!("the agent listener needs --cluster-cert and --cluster-key");
        };
        let agent_tls = tls::ServerTlsFiles {
            cert,
            key,
            client_ca: opt_path(&a.cluster_ca_cert),
        };
        tls::server_config(&agent_tls, &[b"h2"]).context("agent TLS")?;
        let strategies = Strategy::parse_list(&a.proxy_strategies)
            .map_err(|e| anyhow::anyhow!("--proxy-strategies: {e}"))?;
        if a.server_count == 0 {
            bail!("--server-count must be at least 1");
        }
        let mut policy = DestinationPolicy {
            default: Destinations::parse(&a.allowed_destinations)
                .context("--allowed-destinations")?,
            per_agent: Default::default(),
        };
        for entry in &a.agent_allowed_destinations {
            let Some((id, list)) = entry.split_once('=').filter(|(id, _)| !id.is_empty()) else {
                bail!("--agent-allowed-destinations={entry}: want AGENT_ID=LIST");
            };
            let list = Destinations::parse(list)
                .with_context(|| format!("--agent-allowed-destinations for agent {id}"))?;
            if policy.per_agent.insert(id.to_string(), list).is_some() {
                bail!("--agent-allowed-destinations: agent {id} given twice");
            }
        }
        let tokens = match opt_path(&a.agent_tokens_file) {
            Some(p) => {
                let t = TokenFile::new(p);
                t.load().context("--agent-tokens-file")?;
                Some(Arc::new(t))
            }
            None => None,
        };
        if a.max_pending_dials_per_agent == 0 || a.max_connections_per_agent == 0 {
            bail!("--max-pending-dials-per-agent and --max-connections-per-agent must be positive");
        }
        let health_addr = listen_addr(&a.health_bind_address, a.health_port);
        let admin_addr = listen_addr(&a.admin_bind_address, a.admin_port);
        let server_id = if a.server_id.is_empty() {
            format!("{:016x}", rand::random::<u64>())
        } else {
            a.server_id
        };
        Ok(Config {
            mode,
            frontend,
            agent_addr: listen_addr(&a.agent_bind_address, a.agent_port),
            agent_tls,
            admin_addr: (admin_addr != health_addr).then_some(admin_addr),
            health_addr,
            server_id,
            server_count: a.server_count,
            strategies,
            policy,
            keepalive_time: a.keepalive_time,
            keepalive_timeout: a.keepalive_timeout,
            frontend_keepalive_time: a.frontend_keepalive_time,
            tokens,
            dial_timeout: a.dial_timeout,
            max_pending: a.max_pending_dials_per_agent,
            max_conns: a.max_connections_per_agent,
            stall_timeout: a.stall_timeout,
            max_buffered: a.max_buffered_bytes,
            grace_period: a.grace_period,
            flow_control: a.flow_control,
            agent_quic: a.enable_agent_quic.then_some(a.agent_quic_port),
            kube,
        })
    }
}

#[cfg(test)]
mod tests;
