//! Hop 3: the proxy-server's own view, from its admin endpoint (`/readyz`
//! and `/debug/...`, see `proxy-server/src/diagnostics.rs`): is it ready,
//! which agents are connected, which one would serve this destination, and
//! who was refused recently.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{Check, Hop, Status};

/// An agent silent for longer than this is taken as unresponsive: our server
/// sends a heartbeat every 2 s and our agent answers each (`window-v1`).
/// Agents without flow control (the reference's) send only with traffic, so
/// their silence is not judged.
pub const SILENT: Duration = Duration::from_secs(10);

/// `GET path` on the admin endpoint: status and body.
pub async fn get(admin: &str, path: &str, limit: Duration) -> Result<(u16, String), String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("connect {admin}: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.take(4 * 1024 * 1024)
            .read_to_end(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {admin} within {limit:?}")))
}

/// What hop 3 found, for the later hops.
#[derive(Debug, Default, Clone)]
pub struct ServerView {
    /// The agent that would serve the destination, and how recently it spoke.
    pub agent: Option<(String, f64)>,
}

fn agent_line(a: &Value) -> String {
    let ids = &a["identifiers"];
    let list = |k: &str| {
        ids[k]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    format!(
        "agent {} (from {}, up {:.0} s, last packet {:.1} s ago{}): ipv4=[{}] ipv6=[{}] host=[{}] cidr=[{}] default-route={}",
        a["agent_id"].as_str().unwrap_or("?"),
        a["peer"].as_str().unwrap_or("?"),
        a["age_seconds"].as_f64().unwrap_or(0.0),
        a["last_packet_seconds_ago"].as_f64().unwrap_or(0.0),
        if a["draining"].as_bool() == Some(true) { ", draining" } else { "" },
        list("ipv4"),
        list("ipv6"),
        list("host"),
        list("cidr"),
        ids["default_route"].as_bool().unwrap_or(false),
    )
}

/// The verdict from the admin endpoint's answers (pure: tested without a
/// server). `route`, `agents` and `events` are the JSON documents, `ready`
/// the `/readyz` status and text.
pub fn judge(
    target: &str,
    ready: (u16, &str),
    route: &Value,
    agents: &Value,
    events: &Value,
) -> (Check, ServerView) {
    let mut view = ServerView { agent: None };
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let refusals: Vec<String> = events["refusals"]
        .as_array()
        .map(|r| {
            r.iter()
                .rev()
                .take(5)
                .map(|e| {
                    format!(
                        "refused {} {}from {}: {} ({})",
                        e["time"].as_str().unwrap_or("?"),
                        e["agent_id"]
                            .as_str()
                            .map(|a| format!("agent {a} "))
                            .unwrap_or_default(),
                        e["peer"].as_str().unwrap_or("?"),
                        e["message"].as_str().unwrap_or(""),
                        e["reason"].as_str().unwrap_or("?"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let strategies = route["strategies"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    match route["agent"].as_object() {
        None => {
            let mut c = Check::new(
                Hop::Server,
                Status::Failed,
                format!("no connected agent serves {host} (strategies {strategies})"),
            );
            if ready.0 != 200 {
                c = c.evidence(format!("server /readyz: {} {}", ready.0, ready.1.trim()));
            }
            let list = agents["agents"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                c = c.evidence("agents connected: none");
            }
            for a in &list {
                c = c.evidence(format!("connected: {}", agent_line(a)));
            }
            for r in &refusals {
                c = c.evidence(r.clone());
            }
            c = c.next("is the agent pod on that node running? kubectl -n kube-system get pods -o wide --field-selector spec.nodeName=<node>, then its logs");
            if !refusals.is_empty() {
                c = c.next("the server refused agents recently (above): check the agent's CA, client certificate or service-account token and audience");
            } else if !list.is_empty() && strategies.contains("destHost") {
                c = c.next(format!(
                    "with destHost, an agent must advertise {host} in --agent-identifiers (ipv4=/ipv6=/host=); add default to --proxy-strategies to fall back to any agent"
                ));
            }
            (c, view)
        }
        Some(_) => {
            let a = &route["agent"];
            let id = a["agent_id"].as_str().unwrap_or("?").to_string();
            let silent = a["last_packet_seconds_ago"].as_f64().unwrap_or(0.0);
            let flow = a["flow_control"].as_bool().unwrap_or(false);
            view.agent = Some((id.clone(), silent));
            let strategy = route["strategy"].as_str().unwrap_or("?");
            if flow && silent > SILENT.as_secs_f64() {
                let c = Check::new(
                    Hop::Server,
                    Status::Failed,
                    format!("agent {id} would serve {host} but has been silent for {silent:.0} s"),
                )
                .evidence(agent_line(a))
                .next("the agent's stream is probably dead (network partition, agent hung): check the agent's logs; it reconnects by itself once its heartbeat check fails");
                return (c, view);
            }
            let draining = a["draining"].as_bool() == Some(true);
            let mut c = Check::new(
                Hop::Server,
                if draining { Status::Warn } else { Status::Ok },
                format!(
                    "agent {id} serves {host} (strategy {strategy}{})",
                    if draining { "; it is draining" } else { "" }
                ),
            )
            .evidence(agent_line(a))
            .evidence(format!(
                "{} agent stream(s) connected; strategies {strategies}",
                route["agents_connected"].as_u64().unwrap_or(0)
            ));
            if draining {
                c = c.next("the agent is shutting down: new dials prefer other agents; if it does not come back, check the DaemonSet rollout");
            }
            (c, view)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(id: &str, silent: f64) -> Value {
        json!({"agent_id": id, "peer": "10.0.0.5:4000", "age_seconds": 30.0,
               "last_packet_seconds_ago": silent, "draining": false, "flow_control": true,
               "identifiers": {"ipv4": ["10.0.0.5"], "ipv6": [], "host": [], "cidr": [], "default_route": false}})
    }

    #[test]
    fn no_agent_names_the_refusals() {
        let route = json!({"agent": null, "strategies": ["destHost"], "agents_connected": 1});
        let agents = json!({"agents": [agent("node-1", 0.5)]});
        let events = json!({"refusals": [{"time": "t", "peer": "10.0.0.6:1", "agent_id": "node-2",
            "reason": "token_not_authenticated", "message": "agent node-2: token not authenticated"}]});
        let (c, _) = judge("10.0.0.6:10250", (200, "ok"), &route, &agents, &events);
        assert_eq!(c.status, Status::Failed);
        assert!(c.summary.contains("10.0.0.6"), "{}", c.summary);
        assert!(
            c.evidence
                .iter()
                .any(|e| e.contains("token_not_authenticated")),
            "{:?}",
            c.evidence
        );
        assert!(
            c.evidence.iter().any(|e| e.contains("agent node-1")),
            "{:?}",
            c.evidence
        );
    }

    #[test]
    fn a_silent_agent_fails_and_a_live_one_passes() {
        let route = |a: Value| json!({"agent": a, "strategy": "destHost", "strategies": ["destHost"], "agents_connected": 1});
        let (c, _) = judge(
            "10.0.0.5:10250",
            (200, "ok"),
            &route(agent("n", 30.0)),
            &json!({}),
            &json!({}),
        );
        assert_eq!(c.status, Status::Failed);
        assert!(c.summary.contains("silent"));
        let (c, view) = judge(
            "10.0.0.5:10250",
            (200, "ok"),
            &route(agent("n", 0.3)),
            &json!({}),
            &json!({}),
        );
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert_eq!(view.agent.unwrap().0, "n");
    }

    #[test]
    fn a_draining_agent_warns_and_an_unready_server_with_no_agent_says_so() {
        let mut a = agent("node-1", 0.2);
        a["draining"] = json!(true);
        let route = json!({"agent": a, "strategy": "destHost", "strategies": ["destHost"], "agents_connected": 1});
        let (c, view) = judge(
            "10.0.0.5:10250",
            (200, "ok"),
            &route,
            &json!({}),
            &json!({}),
        );
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.summary.contains("draining"), "{}", c.summary);
        assert!(!c.next.is_empty());
        assert_eq!(view.agent.unwrap().0, "node-1");

        // No agent at all, the server not ready, and an agent refused for
        // its identity: each shows in the evidence.
        let route =
            json!({"agent": null, "strategies": ["destHost", "default"], "agents_connected": 0});
        let events = json!({"refusals": [{"time": "t", "peer": "10.0.0.7:1",
            "reason": "bad_identifiers", "message": "agentIdentifiers: bad entry \"ipv4=x\""}]});
        let (c, view) = judge(
            "10.0.0.7:10250",
            (503, "no connection to any proxy agent"),
            &route,
            &json!({"agents": []}),
            &events,
        );
        assert_eq!(c.status, Status::Failed);
        assert!(view.agent.is_none());
        for want in ["/readyz: 503", "agents connected: none", "bad_identifiers"] {
            assert!(
                c.evidence.iter().any(|e| e.contains(want)),
                "{want}: {:?}",
                c.evidence
            );
        }
        assert!(
            c.next.iter().any(|n| n.contains("refused agents")),
            "{:?}",
            c.next
        );
    }
}
