//! Agent metrics: upstream names first (`konnectivity_network_proxy_agent_*`,
//! read by the upstream test suite), then ours (bytes relayed, stalls).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

const NS: &str = "konnectivity_network_proxy";
const SUB: &str = "agent";

/// Every metric the agent updates.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// Server streams held now.
    pub open_server_connections: IntGauge,
    /// Server count the agent is aiming for.
    pub known_server_count: IntGauge,
    /// Destination connections open now.
    pub open_endpoint_connections: IntGauge,
    /// Destination dials in progress.
    pub pending_endpoint_dials: IntGauge,
    /// Destination dial failures by reason (`timeout`, `unknown`).
    pub endpoint_dial_failures: IntCounterVec,
    /// Destination dial latency.
    pub dial_duration: Histogram,
    /// Failures to open a server stream, by reason.
    pub server_connection_failures: IntCounterVec,
    /// Bytes relayed, by direction (`to_server`, `to_endpoint`).
    pub bytes: IntCounterVec,
    /// Connections closed because their destination stopped reading.
    pub stalled_closed: IntCounter,
    /// Packets for connections this agent does not know, by packet type.
    pub unknown_packets: IntCounterVec,
    /// Server streams whose connections travel over QUIC now.
    pub quic_connections: IntGauge,
    /// QUIC connections that failed to open or were lost, by reason
    /// (`connect`, `hello`, `lost`).
    pub quic_failures: IntCounterVec,
    /// Dials served, by transport (`grpc`, `quic`).
    pub dials: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NS).subsystem(SUB)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            open_server_connections: IntGauge::with_opts(opts(
                "open_server_connections",
                "Current number of open server connections.",
            ))
            .expect("valid"),
            known_server_count: IntGauge::with_opts(opts(
                "known_server_count",
                "Current number of servers agent is trying to connect to.",
            ))
            .expect("valid"),
            open_endpoint_connections: IntGauge::with_opts(opts(
                "open_endpoint_connections",
                "Current number of open endpoint connections.",
            ))
            .expect("valid"),
            pending_endpoint_dials: IntGauge::with_opts(opts(
                "pending_endpoint_dials",
                "Destination dials in progress (DIAL_REQ received, not answered yet).",
            ))
            .expect("valid"),
            endpoint_dial_failures: IntCounterVec::new(
                opts(
                    "endpoint_dial_failure_total",
                    "Number of failures dialing the remote endpoint, by reason (example: timeout).",
                ),
                &["reason"],
            )
            .expect("valid"),
            dial_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "dial_duration_seconds",
                    "Latency of dial to the remote endpoint in seconds",
                )
                .namespace(NS)
                .subsystem(SUB)
                .buckets(vec![0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0]),
            )
            .expect("valid"),
            server_connection_failures: IntCounterVec::new(
                opts(
                    "server_connection_failure_total",
                    "Failures to open a stream to a proxy server, by reason",
                ),
                &["reason"],
            )
            .expect("valid"),
            bytes: IntCounterVec::new(
                opts("relayed_bytes_total", "Bytes relayed, by direction"),
                &["direction"],
            )
            .expect("valid"),
            stalled_closed: IntCounter::with_opts(opts(
                "stalled_connections_closed_total",
                "Connections closed because their destination stopped reading past --stall-timeout",
            ))
            .expect("valid"),
            unknown_packets: IntCounterVec::new(
                opts(
                    "unknown_connection_packets_total",
                    "Packets received for connections this agent does not know, by packet type",
                ),
                &["packet_type"],
            )
            .expect("valid"),
            quic_connections: IntGauge::with_opts(opts(
                "quic_server_connections",
                "Server streams whose connections travel over a QUIC connection now",
            ))
            .expect("valid"),
            quic_failures: IntCounterVec::new(
                opts(
                    "quic_failures_total",
                    "QUIC connections to servers that failed to open or were lost, by reason",
                ),
                &["reason"],
            )
            .expect("valid"),
            dials: IntCounterVec::new(
                opts("dials_total", "Dials served, by transport"),
                &["transport"],
            )
            .expect("valid"),
            registry: registry.clone(),
        };
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.open_server_connections.clone()),
            Box::new(m.known_server_count.clone()),
            Box::new(m.open_endpoint_connections.clone()),
            Box::new(m.pending_endpoint_dials.clone()),
            Box::new(m.endpoint_dial_failures.clone()),
            Box::new(m.dial_duration.clone()),
            Box::new(m.server_connection_failures.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.stalled_closed.clone()),
            Box::new(m.unknown_packets.clone()),
            Box::new(m.quic_connections.clone()),
            Box::new(m.quic_failures.clone()),
            Box::new(m.dials.clone()),
        ];
        // Memory, descriptors and tokio tasks of the process itself.
        collectors.push(Box::new(
            konnectivity_runtime::process::ProcessCollector::new(),
        ));
        for c in collectors {
            registry.register(c).expect("metric names are unique");
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
