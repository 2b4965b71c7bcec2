//! What the admin endpoint tells an operator (or `kubectl konnectivity
//! diagnose`) about this server, as JSON:
//!
//! - `GET /debug/agents`: every agent stream: id, identifiers, peer address,
//!   age, time since its last packet, draining, flow control, pending dials,
//!   open connections, bytes both ways, packets queued towards it.
//! - `GET /debug/connections`: every open connection (frontend, agent,
//!   destination, age, bytes, chunks queued towards the frontend) and pending
//!   dial.
//! - `GET /debug/route?address=host:port`: the stream a dial would take now,
//!   and by which strategy (nothing is dialled).
//! - `GET /debug/events`: the most recent agent refusals (TLS, token,
//!   identity) and dial failures with their reasons, newest last, at most
//!   [`EVENTS_KEPT`] of each.
//!
//! Served on the admin listener only (`--admin-bind-address`, loopback by
//! default), never on the health port.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use konnectivity_runtime::admin::Recent;
use serde_json::{json, Value};

use crate::backend::agent::AgentLink;
use crate::backend::registry::AgentRegistry;
use crate::tunnel::DialError;

/// Refusals and dial failures kept, each.
pub const EVENTS_KEPT: usize = 64;

/// Recent refusals and dial failures, bounded.
pub struct Events {
    refusals: Recent<Value>,
    dial_failures: Recent<Value>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            refusals: Recent::new(EVENTS_KEPT),
            dial_failures: Recent::new(EVENTS_KEPT),
        }
    }
}

/// Now, as RFC 3339 (the events' `time`).
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Events {
    /// An agent was refused: at the TLS handshake (`reason` `tls`), or on its
    /// stream (token, identity, metadata; the `agent_refused_total` reasons).
    pub fn agent_refused(&self, peer: &str, agent_id: Option<&str>, reason: &str, message: &str) {
        self.refusals.push(json!({
                "time": now(),
                "peer": peer,
                "agent_id": agent_id,
                "reason": reason,
                "message": message,
        }));
    }

    /// A dial failed.
    pub fn dial_failed(&self, destination: &str, frontend: &str, e: &DialError) {
        let agent = e.agent();
        self.dial_failures.push(json!({
                "time": now(),
                "destination": destination,
                "frontend": frontend,
                "agent_id": agent,
                "reason": e.kind().as_str(),
                "message": e.to_string(),
        }));
    }

    fn json(&self) -> Value {
        json!({
            "refusals": self.refusals.snapshot(),
            "dial_failures": self.dial_failures.snapshot(),
        })
    }
}

fn agent_json(l: &AgentLink) -> Value {
    let snap = l.snapshot();
    let id = &l.identifiers;
    json!({
        "agent_id": l.agent_id,
        "stream": l.serial,
        "peer": l.peer,
        "identifiers": {
            "host": id.host,
            "ipv4": id.ipv4.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "ipv6": id.ipv6.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "cidr": id.cidr,
            "default_route": id.default_route,
        },
        "connected_at": humantime::format_rfc3339_seconds(l.liveness.connected_at).to_string(),
        "age_seconds": l.liveness.age().as_secs_f64(),
        "last_packet_seconds_ago": l.liveness.since_last().as_secs_f64(),
        "draining": l.is_draining(),
        "flow_control": l.flow,
        "pending_dials": snap.pending.len(),
        "connections": snap.conns.len(),
        "bytes_from_agent": l.bytes_from_agent.load(Ordering::Relaxed),
        "bytes_to_agent": l.bytes_to_agent.load(Ordering::Relaxed),
        "queued_packets": l.queued(),
    })
}

/// The JSON for `path` (`query` is the raw query string), or `None` for an
/// unknown path.
pub fn render(
    registry: &AgentRegistry,
    server_id: &str,
    path: &str,
    query: Option<&str>,
) -> Option<Result<Value, String>> {
    Some(Ok(match path {
        "/debug/agents" => {
            let agents: Vec<Value> = registry.links().iter().map(|l| agent_json(l)).collect();
            json!({ "server_id": server_id, "agents": agents })
        }
        "/debug/connections" => {
            let mut conns = Vec::new();
            let mut pending = Vec::new();
            for l in registry.links() {
                let snap = l.snapshot();
                for (random, info) in snap.pending {
                    pending.push(json!({
                        "agent_id": l.agent_id,
                        "stream": l.serial,
                        "random": random,
                        "destination": info.destination,
                        "frontend": info.origin,
                        "age_seconds": info.started.elapsed().as_secs_f64(),
                    }));
                }
                for (connect_id, info, queued, transport) in snap.conns {
                    conns.push(json!({
                        "agent_id": l.agent_id,
                        "stream": l.serial,
                        "connect_id": connect_id,
                        "destination": info.destination,
                        "frontend": info.origin,
                        "age_seconds": info.started.elapsed().as_secs_f64(),
                        "bytes_to_agent": info.to_tunnel.load(Ordering::Relaxed),
                        "bytes_to_frontend": info.from_tunnel.load(Ordering::Relaxed),
                        "queued_chunks": queued,
                        "transport": transport,
                    }));
                }
            }
            json!({ "connections": conns, "pending": pending })
        }
        "/debug/route" => {
            let address = query
                .into_iter()
                .flat_map(|q| form_urlencoded::parse(q.as_bytes()))
                .find(|(k, _)| k == "address")
                .map(|(_, v)| v.into_owned());
            let Some(address) = address else {
                return Some(Err("missing ?address=host:port".into()));
            };
            let choice = registry.preview(&address);
            json!({
                "address": address,
                "strategies": registry.strategies().iter().map(|s| s.name()).collect::<Vec<_>>(),
                "agents_connected": registry.len(),
                "strategy": choice.as_ref().map(|c| c.strategy.name()),
                "agent": choice.as_ref().map(|c| agent_json(&c.link)),
            })
        }
        "/debug/events" => registry.events().json(),
        _ => return None,
    }))
}
