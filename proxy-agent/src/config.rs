//! Command-line flags with the upstream names and defaults, given as
//! `--name=value` (Go formatting is accepted: `--keepalive-time=1h0m0s`,
//! `--alpn-proto=[]`, `--sync-forever=false`), and the validated [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use konnectivity_proto::metadata::AgentIdentifiers;
use konnectivity_proto::policy::Destinations;
use konnectivity_runtime::addr::listen_addr;
use konnectivity_runtime::flag::go_bool;
use konnectivity_runtime::{duration, logging, tls};

/// Flags of `proxy-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "proxy-agent",
    version,
    about = "Konnectivity proxy agent (Rust)",
    args_override_self = true
)]
pub struct Args {
    /// Client certificate presented to the server.
    #[arg(long, default_value = "")]
    pub agent_cert: String,
    /// Key of --agent-cert.
    #[arg(long, default_value = "")]
    pub agent_key: String,
    /// CA that the server's certificate must chain to.
    #[arg(long, default_value = "")]
    pub ca_cert: String,
    /// Server host (one address, possibly load-balanced over several servers).
    #[arg(long, default_value = "127.0.0.1")]
    pub proxy_server_host: String,
    /// Server agent port.
    #[arg(long, default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// TLS ALPN protocols offered to the server (default h2).
    #[arg(long, default_value = "[]")]
    pub alpn_proto: String,
    /// Health listener host (empty = all addresses).
    #[arg(long, default_value = "")]
    pub health_server_host: String,
    /// Health port: /healthz, /readyz, /metrics.
    #[arg(long, default_value_t = 8093)]
    pub health_server_port: u16,
    /// Admin port (also /metrics).
    #[arg(long, default_value_t = 8094)]
    pub admin_server_port: u16,
    /// Admin listener address.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    /// This agent's id (default: $PROXY_AGENT_ID or a random id).
    #[arg(long, default_value = "", env = "PROXY_AGENT_ID")]
    pub agent_id: String,
    /// Identifiers for destHost/defaultRoute: host=..&ipv4=..&ipv6=..&cidr=..&default-route=true.
    #[arg(long, default_value = "")]
    pub agent_identifiers: String,
    /// Base delay between attempts to reach --server-count servers.
    #[arg(long, default_value = "1s", value_parser = duration::parse)]
    pub sync_interval: Duration,
    /// Largest delay between attempts (exponential backoff with jitter).
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub sync_interval_cap: Duration,
    /// Keep the sync loop probing for servers after all are connected.
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true")]
    pub sync_forever: bool,
    /// How often readiness is re-evaluated (accepted for compatibility).
    #[arg(long, default_value = "1s", value_parser = duration::parse)]
    pub probe_interval: Duration,
    /// HTTP/2 ping interval towards the server. Reference servers refuse pings
    /// more often than every 30 s, so lower values are raised to 30 s; dead
    /// paths to our own server are found in seconds by its heartbeats.
    #[arg(long, default_value = "30s", value_parser = duration::parse)]
    pub keepalive_time: Duration,
    /// How long to wait for a ping answer.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub keepalive_timeout: Duration,
    /// Service-account token sent as `Bearer`; re-read on every connect.
    #[arg(long, default_value = "")]
    pub service_account_token_path: String,
    /// How long a destination dial may take.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub dial_timeout: Duration,
    /// Address ranges and ports this agent may dial, comma-separated
    /// (`10.0.0.0/8:10250,[fd00::/8]:10250,*:443`); names are resolved first
    /// and only allowed addresses are tried. Empty: any destination.
    #[arg(long, default_value = "")]
    pub allowed_destinations: String,
    /// Pending dials allowed per server stream.
    #[arg(long, default_value_t = 1024)]
    pub max_pending_dials: usize,
    /// Open connections allowed per server stream.
    #[arg(long, default_value_t = 65536)]
    pub max_connections: usize,
    /// How long one connection's full queue may hold up its server stream
    /// before only that connection is closed.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub stall_timeout: Duration,
    /// After the first SIGTERM, how long open connections may finish.
    #[arg(long, default_value = "30s", value_parser = duration::parse)]
    pub grace_period: Duration,
    /// Offer per-connection flow control and heartbeats to the server.
    #[arg(long, default_value = "true", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true")]
    pub flow_control: bool,
    /// How tunnelled connections travel: `auto` (a QUIC stream each when the
    /// server offers QUIC and UDP gets through, else the gRPC stream), `grpc`
    /// (never QUIC), or `quic` (a stream whose server does not offer QUIC,
    /// or whose QUIC connection fails, is dropped and opened again).
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Logging (`--log-format`, klog's `--v`, `--logtostderr`, `--alsologtostderr`).
    #[command(flatten)]
    pub log: logging::LogArgs,

    // Accepted so upstream manifests and the upstream test framework (which
    // passes every flag) start us unchanged; see the README for what each does.
    /// Accepted; no profiling endpoint is served.
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub enable_profiling: bool,
    /// Accepted; no profiling endpoint is served.
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub enable_contention_profiling: bool,
    /// Accepted; queues are sized per connection here.
    #[arg(long, default_value = "150", hide = true)]
    pub xfr_channel_size: String,
    /// Accepted; queues are sized per connection here.
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub warn_on_channel_limit: bool,
    /// Learn the number of servers by counting their unexpired Leases
    /// (published by servers with --enable-lease-controller).
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true")]
    pub count_server_leases: bool,
    /// Namespace of the server Leases.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Label selector of the server Leases (`--lease-label-selector` is the
    /// same flag).
    #[arg(
        long,
        alias = "lease-label-selector",
        default_value = "k8s-app=konnectivity-server"
    )]
    pub lease_label: String,
    /// `default`: the lease count with --count-server-leases, else the
    /// servers' serverCount; `max`: the larger of the two (without leases,
    /// the largest serverCount seen).
    #[arg(long, default_value = "default")]
    pub server_count_source: String,
    /// Kubeconfig for counting Leases. Empty = the in-cluster config.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// Accepted for compatibility; JSON is used.
    #[arg(long, default_value = "", hide = true)]
    pub kube_api_content_type: String,
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    /// Host name or address (also the TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// CA file.
    pub ca_cert: PathBuf,
    /// Client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// ALPN offered.
    pub alpn: Vec<Vec<u8>>,
}

/// Where the agent counts server Leases.
#[derive(Debug, Clone)]
pub struct LeaseSource {
    /// `--kubeconfig`; `None` = in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// `--lease-namespace`.
    pub namespace: String,
    /// `--lease-label`.
    pub selector: String,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server.
    pub server: ServerTarget,
    /// This agent's id.
    pub agent_id: String,
    /// This agent's identifiers.
    pub identifiers: AgentIdentifiers,
    /// Token file.
    pub token_path: Option<PathBuf>,
    /// Health listener.
    pub health_addr: String,
    /// Admin listener, when different from health.
    pub admin_addr: Option<String>,
    /// Backoff base.
    pub sync_interval: Duration,
    /// Backoff cap.
    pub sync_interval_cap: Duration,
    /// Probe for new servers even when all are held.
    pub sync_forever: bool,
    /// Use the largest count seen rather than the latest (`--server-count-source=max`).
    pub server_count_max: bool,
    /// Count server Leases (`--count-server-leases`).
    pub leases: Option<LeaseSource>,
    /// HTTP/2 ping interval (at least 30 s).
    pub keepalive_time: Duration,
    /// Ping answer timeout.
    pub keepalive_timeout: Duration,
    /// Destination dial timeout.
    pub dial_timeout: Duration,
    /// Where dials may go (`--allowed-destinations`).
    pub allowed: Destinations,
    /// Pending dials per stream.
    pub max_pending: usize,
    /// Connections per stream.
    pub max_conns: usize,
    /// Stall timeout.
    pub stall_timeout: Duration,
    /// Drain grace period.
    pub grace_period: Duration,
    /// Offer `window-v1`.
    pub flow_control: bool,
    /// `--transport`.
    pub transport: Transport,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC when offered and reachable, else gRPC.
    Auto,
    /// Never QUIC.
    Grpc,
    /// QUIC or nothing.
    Quic,
}

impl Transport {
    /// Offer QUIC to the server?
    pub fn offers_quic(self) -> bool {
        self != Transport::Grpc
    }
}

/// Reference servers send GOAWAY `too_many_pings` below this ping interval.
pub const MIN_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Parses Go's string-slice form `[a,b]` (or plain `a,b`).
fn go_list(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

impl Config {
    /// Validates flags, loading the TLS material once to fail early.
    pub fn from_args(a: Args) -> anyhow::Result<Self> {
        use anyhow::{bail, Context};
        if a.ca_cert.is_empty() {
            bail!("--ca-cert is required: the CA that signed the server's certificate");
        }
        let identity = match (a.agent_cert.is_empty(), a.agent_key.is_empty()) {
            (true, true) => None,
            (false, false) => Some((PathBuf::from(&a.agent_cert), PathBuf::from(&a.agent_key))),
            _ => bail!("--agent-cert and --agent-key must be given together"),
        };
        let mut alpn: Vec<Vec<u8>> = go_list(&a.alpn_proto)
            .into_iter()
            .map(String::into_bytes)
            .collect();
        if alpn.is_empty() {
            alpn.push(b"h2".to_vec());
        }
        let server = ServerTarget {
            host: a
                .proxy_server_host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: a.proxy_server_port,
            ca_cert: PathBuf::from(&a.ca_cert),
            identity,
            alpn,
        };
        {
            let id = server
                .identity
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            let alpn: Vec<&[u8]> = server.alpn.iter().map(Vec::as_slice).collect();
            tls::client_config(&server.ca_cert, id, &alpn).context("agent TLS")?;
        }
        if a.proxy_server_port == 0 {
            bail!("--proxy-server-port must be positive");
        }
        if a.sync_interval > a.sync_interval_cap {
            bail!(
                "--sync-interval ({:?}) must not exceed --sync-interval-cap ({:?})",
                a.sync_interval,
                a.sync_interval_cap
            );
        }
        if a.sync_interval.is_zero() {
            bail!("--sync-interval must be positive");
        }
        if a.keepalive_timeout.is_zero() {
            bail!("--keepalive-timeout must be positive");
        }
        let kubeconfig = (!a.kubeconfig.is_empty()).then(|| PathBuf::from(&a.kubeconfig));
        if let Some(p) = &kubeconfig {
            std::fs::metadata(p).with_context(|| format!("--kubeconfig {}", p.display()))?;
        }
        let leases = if a.count_server_leases {
            if a.lease_namespace.is_empty() || a.lease_label.trim().is_empty() {
                bail!("--count-server-leases needs --lease-namespace and --lease-label");
            }
            Some(LeaseSource {
                kubeconfig,
                namespace: a.lease_namespace.clone(),
                selector: a.lease_label.trim().to_string(),
            })
        } else {
            None
        };
        let server_count_max = match a.server_count_source.as_str() {
            "" | "default" => false,
            "max" => true,
            s => bail!("--server-count-source={s}: want default or max"),
        };
        let identifiers = AgentIdentifiers::parse(&a.agent_identifiers)
            .map_err(|e| anyhow::anyhow!("--agent-identifiers: {e}"))?;
        let token_path = (!a.service_account_token_path.is_empty())
            .then(|| PathBuf::from(&a.service_account_token_path));
        if let Some(p) = &token_path {
            std::fs::read(p)
                .with_context(|| format!("--service-account-token-path {}", p.display()))?;
        }
        let agent_id = if a.agent_id.is_empty() {
            format!("{:016x}", rand::random::<u64>())
        } else {
            a.agent_id
        };
        if a.max_pending_dials == 0 || a.max_connections == 0 {
            bail!("--max-pending-dials and --max-connections must be positive");
        }
        let health_addr = listen_addr(&a.health_server_host, a.health_server_port);
        let admin_addr = listen_addr(&a.admin_bind_address, a.admin_server_port);
        Ok(Config {
            server,
            agent_id,
            identifiers,
            token_path,
            admin_addr: (admin_addr != health_addr).then_some(admin_addr),
            health_addr,
            sync_interval: a.sync_interval,
            sync_interval_cap: a.sync_interval_cap,
            sync_forever: a.sync_forever,
            server_count_max,
            leases,
            keepalive_time: a.keepalive_time.max(MIN_PING_INTERVAL),
            keepalive_timeout: a.keepalive_timeout,
            dial_timeout: a.dial_timeout,
            allowed: Destinations::parse(&a.allowed_destinations)
                .context("--allowed-destinations")?,
            max_pending: a.max_pending_dials,
            max_conns: a.max_connections,
            stall_timeout: a.stall_timeout,
            grace_period: a.grace_period,
            flow_control: a.flow_control,
            transport: match a.transport.as_str() {
                "auto" => Transport::Auto,
                "grpc" => Transport::Grpc,
                "quic" => Transport::Quic,
                t => bail!("--transport={t}: want auto, grpc or quic"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_formatted_values_parse() {
        assert_eq!(go_list("[]"), Vec::<String>::new());
        assert_eq!(go_list("[h2,http/1.1]"), vec!["h2", "http/1.1"]);
        assert_eq!(go_bool("false"), Ok(false));
        let a = Args::try_parse_from([
            "proxy-agent",
            "--keepalive-time=1h0m0s",
            "--sync-forever=false",
            "--alpn-proto=[]",
            "--agent-identifiers=",
            "--xfr-channel-size=150",
            "--v=4",
            "--logtostderr=true",
        ])
        .expect("upstream-style flags parse");
        assert_eq!(a.keepalive_time, Duration::from_secs(3600));
        assert_eq!(a.log.verbosity, 4);
    }

    #[test]
    fn lease_flags_have_upstream_defaults_and_an_alias() {
        let a = Args::try_parse_from(["proxy-agent", "--count-server-leases"]).unwrap();
        assert!(a.count_server_leases);
        assert_eq!(a.lease_namespace, "kube-system");
        assert_eq!(a.lease_label, "k8s-app=konnectivity-server");
        let a = Args::try_parse_from(["proxy-agent", "--lease-label-selector=app=x"]).unwrap();
        assert_eq!(a.lease_label, "app=x");
        assert!(Args::try_parse_from(["proxy-agent", "--count-server-leases=maybe"]).is_err());
    }
}
