//! What the agent's admin endpoint tells an operator, as JSON (served on
//! the admin listener only, `--admin-bind-address`, loopback by default):
//!
//! - `GET /debug/servers`: every server stream: server id, address, age, time
//!   since its last packet, flow control, typed dial reasons, pending dials,
//!   open connections.
//! - `GET /debug/connections`: every open connection: server, connectID,
//!   destination, age, bytes both ways, chunks queued towards the
//!   destination.
//! - `GET /debug/events`: the most recent failed dials (with their reason
//!   and the words the server was given) and failed attempts to open a
//!   stream (refused by the server: certificate, token, identity), newest
//!   last, at most [`EVENTS_KEPT`] of each.

use std::sync::Arc;

use konnectivity_proto::DialReason;
use konnectivity_runtime::admin::Recent;
use serde_json::{json, Value};

use crate::stream::ServerLink;

/// Events kept, each kind.
pub const EVENTS_KEPT: usize = 64;

/// Recent failures, bounded.
pub struct Events {
    dial_failures: Recent<Value>,
    stream_failures: Recent<Value>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            dial_failures: Recent::new(EVENTS_KEPT),
            stream_failures: Recent::new(EVENTS_KEPT),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Events {
    /// A dial of `destination` for `server_id` failed.
    pub fn dial_failed(&self, destination: &str, server_id: &str, reason: DialReason, text: &str) {
        self.dial_failures.push(json!({
            "time": now(),
            "destination": destination,
            "server_id": server_id,
            "reason": reason.as_str(),
            "message": text,
        }));
    }

    /// A stream to the server could not be opened.
    pub fn stream_failed(&self, reason: &str, message: &str) {
        self.stream_failures.push(json!({
            "time": now(),
            "reason": reason,
            "message": message,
        }));
    }
}

fn server_json(l: &ServerLink) -> Value {
    let (pending, conns) = l.snapshot();
    json!({
        "server_id": l.server_id,
        "address": l.addr,
        "connected_at": humantime::format_rfc3339_seconds(l.liveness.connected_at).to_string(),
        "age_seconds": l.liveness.age().as_secs_f64(),
        "last_packet_seconds_ago": l.liveness.since_last().as_secs_f64(),
        "flow_control": l.flow,
        "dial_reasons": l.dial_reason,
        "pending_dials": pending,
        "connections": conns.len(),
    })
}

/// The JSON for `path`, or `None` for an unknown path.
pub fn render(
    agent_id: &str,
    links: &[Arc<ServerLink>],
    events: &Events,
    path: &str,
) -> Option<Value> {
    Some(match path {
        "/debug/servers" => json!({
            "agent_id": agent_id,
            "servers": links.iter().map(|l| server_json(l)).collect::<Vec<_>>(),
        }),
        "/debug/connections" => {
            let mut out = Vec::new();
            for l in links {
                for (connect_id, info, queued, transport) in l.snapshot().1 {
                    out.push(json!({
                        "server_id": l.server_id,
                        "connect_id": connect_id,
                        "destination": info.destination,
                        "age_seconds": info.started.elapsed().as_secs_f64(),
                        "bytes_to_server": info.to_tunnel.load(std::sync::atomic::Ordering::Relaxed),
                        "bytes_to_destination": info.from_tunnel.load(std::sync::atomic::Ordering::Relaxed),
                        "queued_chunks": queued,
                        "transport": transport,
                    }));
                }
            }
            json!({ "connections": out })
        }
        "/debug/events" => json!({
            "dial_failures": events.dial_failures.snapshot(),
            "stream_failures": events.stream_failures.snapshot(),
        }),
        _ => return None,
    })
}
