//! Stream metadata: header names and the `agentIdentifiers` encoding.
//!
//! gRPC metadata keys travel lower-cased; the Go peers write them mixed-case
//! and compare case-insensitively, so we always use the lower-case forms.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Agent -> server: the agent's id (exactly one value).
pub const AGENT_ID: &str = "agentid";
/// Agent -> server: URL-query encoded identifiers (at most one value).
pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
/// Agent -> server: `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
/// Server -> agent response header: the server's id.
pub const SERVER_ID: &str = "serverid";
/// Server -> agent response header: how many servers the agent should hold.
pub const SERVER_COUNT: &str = "servercount";
/// Both ways, our extension: the features a peer speaks. Reference peers never
/// send it and ignore it, so an absent header means "none".
pub const FEATURES: &str = "x-konnectivity-rs-features";
/// Feature: per-connection credit flow control with `WINDOW` packets, and
/// server heartbeats (`WINDOW{0,0}`).
pub const FEATURE_FLOW_CONTROL: &str = "window-v1";
/// Feature: failed `DIAL_RSP`s carry a typed reason (`DialResponse.reason`)
/// besides the same error text. Offered by our agent and our clients, answered
/// by our server.
pub const FEATURE_DIAL_REASON: &str = "dial-reason-v1";

/// With `window-v1`, the server sends a heartbeat (`WINDOW{0,0}`) this often
/// and the agent answers each with one; the agent takes [`HEARTBEAT_MISSES`]
/// missed beats as a dead stream, and the server's diagnostics call an agent
/// silent for much longer than this dead. This
/// detects a dead path in seconds without HTTP/2 pings, which reference
/// servers refuse more often than every 30 s.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// Missed heartbeats after which an agent drops the stream.
pub const HEARTBEAT_MISSES: u32 = 3;

/// Does a `FEATURES` header value list `feature`?
pub fn has_feature(header: Option<&str>, feature: &str) -> bool {
    header
        .map(|h| h.split(',').any(|f| f.trim() == feature))
        .unwrap_or(false)
}

/// What an agent says about itself, used by `destHost` and `defaultRoute`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentIdentifiers {
    /// `ipv4=` values.
    pub ipv4: Vec<Ipv4Addr>,
    /// `ipv6=` values.
    pub ipv6: Vec<Ipv6Addr>,
    /// `host=` values.
    pub host: Vec<String>,
    /// `cidr=` values, kept as text.
    pub cidr: Vec<String>,
    /// `default-route=true`.
    pub default_route: bool,
}

/// An `agentIdentifiers` value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    /// `ipv4=` not an IPv4 address.
    #[error("invalid ipv4 identifier {0:?}")]
    Ipv4(String),
    /// `ipv6=` not an IPv6 address.
    #[error("invalid ipv6 identifier {0:?}")]
    Ipv6(String),
    /// `default-route=` not a boolean.
    #[error("invalid default-route identifier {0:?} (want true or false)")]
    DefaultRoute(String),
}

impl AgentIdentifiers {
    /// Parses `host=node-1&ipv4=10.0.0.5&default-route=true`. Unknown keys are
    /// ignored, as the reference server does.
    pub fn parse(s: &str) -> Result<Self, IdentifierError> {
        let mut ids = AgentIdentifiers::default();
        for (k, v) in form_urlencoded::parse(s.trim().as_bytes()) {
            let v = v.trim();
            match &*k {
                "ipv4" => ids
                    .ipv4
                    .push(v.parse().map_err(|_| IdentifierError::Ipv4(v.into()))?),
                "ipv6" => ids.ipv6.push(
                    v.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| IdentifierError::Ipv6(v.into()))?,
                ),
                "host" => ids.host.push(v.to_string()),
                "cidr" => ids.cidr.push(v.to_string()),
                "default-route" => {
                    ids.default_route = match v {
                        "true" | "True" | "TRUE" | "1" => true,
                        "false" | "False" | "FALSE" | "0" => false,
                        _ => return Err(IdentifierError::DefaultRoute(v.into())),
                    }
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Encodes back to the query form.
    pub fn encode(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for h in &self.host {
            s.append_pair("host", h);
        }
        for a in &self.ipv4 {
            s.append_pair("ipv4", &a.to_string());
        }
        for a in &self.ipv6 {
            s.append_pair("ipv6", &a.to_string());
        }
        for c in &self.cidr {
            s.append_pair("cidr", c);
        }
        if self.default_route {
            s.append_pair("default-route", "true");
        }
        s.finish()
    }

    /// Does this agent claim `host` (the host part of a dial address) as one of
    /// its addresses or names? Addresses compare as addresses; a `host`
    /// identifier matches its text, whatever it holds, so `host=10.0.0.5`
    /// serves dials to 10.0.0.5 as it does upstream (which keys every
    /// identifier by its string).
    pub fn serves_host(&self, host: &str) -> bool {
        let by_address = if let Ok(a) = host.parse::<Ipv4Addr>() {
            self.ipv4.contains(&a)
        } else if let Ok(a) = host.parse::<Ipv6Addr>() {
            self.ipv6.contains(&a)
        } else {
            false
        };
        by_address || self.host.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// The host part of `host:port`, with IPv6 brackets removed. An address with
/// no port is returned whole.
pub fn dest_host(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            return &rest[..end];
        }
    }
    match address.rsplit_once(':') {
        // A bare IPv6 address without brackets has several colons and no port.
        Some((h, _)) if !h.contains(':') => h,
        Some(_) => address,
        None => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reference_example_and_ignores_unknown_keys() {
        let ids = AgentIdentifiers::parse("host=node-1&ipv4=10.0.0.5&default-route=true&zone=a")
            .expect("parse");
        assert_eq!(ids.host, vec!["node-1"]);
        assert_eq!(ids.ipv4, vec![Ipv4Addr::new(10, 0, 0, 5)]);
        assert!(ids.default_route);
        assert_eq!(AgentIdentifiers::parse(&ids.encode()), Ok(ids));
    }

    #[test]
    fn rejects_bad_values_with_the_offending_text() {
        assert_eq!(
            AgentIdentifiers::parse("ipv4=10.0.0"),
            Err(IdentifierError::Ipv4("10.0.0".into()))
        );
        assert!(AgentIdentifiers::parse("default-route=maybe").is_err());
    }

    #[test]
    fn dest_host_strips_port_and_brackets() {
        assert_eq!(dest_host("10.0.0.5:10250"), "10.0.0.5");
        assert_eq!(dest_host("[fd00::1]:10250"), "fd00::1");
        assert_eq!(dest_host("node-1:443"), "node-1");
        assert_eq!(dest_host("fd00::1"), "fd00::1");
        assert_eq!(dest_host("node-1"), "node-1");
    }

    #[test]
    fn serves_host_matches_ips_exactly_and_names_case_insensitively() {
        let ids = AgentIdentifiers::parse("host=Node-1&ipv4=10.0.0.5&ipv6=fd00::1").unwrap();
        assert!(ids.serves_host("10.0.0.5"));
        assert!(!ids.serves_host("10.0.0.6"));
        assert!(ids.serves_host("fd00:0::1"));
        assert!(ids.serves_host("node-1"));
        assert!(!ids.serves_host("node-2"));
        // A host identifier holding an address (kube-apiserver dials nodes
        // by InternalIP).
        let ids = AgentIdentifiers::parse("host=198.51.100.7").unwrap();
        assert!(ids.serves_host("198.51.100.7"));
        assert!(!ids.serves_host("198.51.100.8"));
    }

    #[test]
    fn features_header_lists_are_parsed() {
        assert!(has_feature(Some("a, window-v1"), FEATURE_FLOW_CONTROL));
        assert!(!has_feature(Some("window-v2"), FEATURE_FLOW_CONTROL));
        assert!(!has_feature(None, FEATURE_FLOW_CONTROL));
    }
}
