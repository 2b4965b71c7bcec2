//! Server metrics: upstream names first (`konnectivity_network_proxy_server_*`),
//! then ours (bytes relayed, stalled connections, refused agents).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

const NS: &str = "konnectivity_network_proxy";
const SUB: &str = "server";

/// Every metric the server updates, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// Agent streams connected (upstream `ready_backend_connections`).
    pub ready_backend_connections: IntGauge,
    /// Dials sent to an agent and not answered yet.
    pub pending_dials: IntGauge,
    /// Connections established through an agent, open now.
    pub established_connections: IntGauge,
    /// Frontend gRPC streams / HTTP CONNECT sockets open, by mode.
    pub frontend_connections: IntGaugeVec,
    /// Failed dials by reason.
    pub dial_failures: IntCounterVec,
    /// Time from DIAL_REQ to DIAL_RSP.
    pub dial_duration: Histogram,
    /// Bytes relayed, by direction (`to_agent`, `to_frontend`).
    pub bytes: IntCounterVec,
    /// Connections closed because their reader stalled longer than --stall-timeout.
    pub stalled_closed: IntCounter,
    /// Connections closed because the server held --max-buffered-bytes for
    /// frontends and theirs was behind.
    pub buffer_limit_closed: IntCounter,
    /// Packets naming a connection or dial we do not know, by packet type.
    pub unknown_packets: IntCounterVec,
    /// Agent streams refused, by reason.
    pub agent_refused: IntCounterVec,
    /// Malformed packets received, by side.
    pub bad_packets: IntCounterVec,
    /// Control packets (`CLOSE_REQ`, `DIAL_CLS`) dropped because an agent
    /// left its queue full past the overflow bound.
    pub control_dropped: IntCounter,
    /// Agent and frontend streams ended because they spent their budget of
    /// protocol mistakes, by peer (`agent`, `frontend`) and mistake.
    pub peers_cut_off: IntCounterVec,
    /// HTTP/2 connections the server ended for a protocol error, by listener
    /// (`agent`, `frontend`) and reason (the `GOAWAY` error code's name, or
    /// `INVALID_HEADER_BLOCK`).
    pub http2_errors: IntCounterVec,
    /// Agent streams whose dials go over QUIC now.
    pub quic_connections: IntGauge,
    /// QUIC connections refused, by reason (`handshake`, `hello`,
    /// `unknown_ticket`, `busy`).
    pub quic_refused: IntCounterVec,
    /// Dials sent to agents, by transport (`grpc`, `quic`).
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
            ready_backend_connections: IntGauge::with_opts(opts(
                "ready_backend_connections",
                "Number of agent streams connected to this server",
            ))
            .expect("valid"),
            pending_dials: IntGauge::with_opts(opts(
                "pending_backend_dials",
                "Dials sent to agents and not answered yet",
            ))
            .expect("valid"),
            established_connections: IntGauge::with_opts(opts(
                "established_connections",
                "Connections established through agents and open now",
            ))
            .expect("valid"),
            frontend_connections: IntGaugeVec::new(
                opts("frontend_connections", "Open frontend streams or sockets"),
                &["mode"],
            )
            .expect("valid"),
            dial_failures: IntCounterVec::new(
                opts("dial_failure_count", "Failed dials, by reason"),
                &["reason"],
            )
            .expect("valid"),
            dial_duration: Histogram::with_opts(
                HistogramOpts::new("dial_duration_seconds", "Latency of dial to the agent")
                    .namespace(NS)
                    .subsystem(SUB)
                    .buckets(vec![0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect("valid"),
            bytes: IntCounterVec::new(
                opts("relayed_bytes_total", "Bytes relayed, by direction"),
                &["direction"],
            )
            .expect("valid"),
            control_dropped: IntCounter::with_opts(opts(
                "dropped_control_packets_total",
                "CLOSE_REQ/DIAL_CLS packets dropped because the agent's queue stayed full past the overflow bound",
            ))
            .expect("valid"),
            stalled_closed: IntCounter::with_opts(opts(
                "stalled_connections_closed_total",
                "Connections closed because their reader stalled past --stall-timeout",
            ))
            .expect("valid"),
            buffer_limit_closed: IntCounter::with_opts(opts(
                "buffer_limit_connections_closed_total",
                "Connections closed because the server held --max-buffered-bytes for frontends and their frontend was behind",
            ))
            .expect("valid"),
            unknown_packets: IntCounterVec::new(
                opts(
                    "unknown_connection_packets_total",
                    "Packets for a connection or dial this server does not know, by packet type",
                ),
                &["packet_type"],
            )
            .expect("valid"),
            agent_refused: IntCounterVec::new(
                opts("agent_refused_total", "Agent streams refused, by reason"),
                &["reason"],
            )
            .expect("valid"),
            bad_packets: IntCounterVec::new(
                opts(
                    "malformed_packets_total",
                    "Malformed packets received, by side",
                ),
                &["side"],
            )
            .expect("valid"),
            peers_cut_off: IntCounterVec::new(
                opts(
                    "peers_cut_off_total",
                    "Agent and frontend streams ended for too many protocol mistakes, by peer and mistake",
                ),
                &["peer", "reason"],
            )
            .expect("valid"),
            http2_errors: IntCounterVec::new(
                opts(
                    "http2_connection_errors_total",
                    "HTTP/2 connections the server ended for a protocol error, by listener and reason",
                ),
                &["listener", "reason"],
            )
            .expect("valid"),
            quic_connections: IntGauge::with_opts(opts(
                "quic_agent_connections",
                "Agent streams whose dials go over a QUIC connection now",
            ))
            .expect("valid"),
            quic_refused: IntCounterVec::new(
                opts(
                    "quic_refused_total",
                    "QUIC connections refused, by reason",
                ),
                &["reason"],
            )
            .expect("valid"),
            dials: IntCounterVec::new(
                opts("dials_total", "Dials sent to agents, by transport"),
                &["transport"],
            )
            .expect("valid"),
            registry: registry.clone(),
        };
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.ready_backend_connections.clone()),
            Box::new(m.pending_dials.clone()),
            Box::new(m.established_connections.clone()),
            Box::new(m.frontend_connections.clone()),
            Box::new(m.dial_failures.clone()),
            Box::new(m.dial_duration.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.stalled_closed.clone()),
            Box::new(m.buffer_limit_closed.clone()),
            Box::new(m.unknown_packets.clone()),
            Box::new(m.agent_refused.clone()),
            Box::new(m.bad_packets.clone()),
            Box::new(m.control_dropped.clone()),
            Box::new(m.peers_cut_off.clone()),
            Box::new(m.http2_errors.clone()),
            Box::new(m.quic_connections.clone()),
            Box::new(m.quic_refused.clone()),
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
