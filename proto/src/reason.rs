//! Why a dial failed, as a type. Reference peers only send text (Go's net
//! errors: `dial tcp 10.0.0.5:10250: connect: connection refused`), so the
//! reason is read from the text ([`DialReason::from_text`]); between our own
//! agent and server it also travels typed (`DialResponse.reason`, feature
//! [`crate::metadata::FEATURE_DIAL_REASON`]) and the text stays the same.
//!
//! One place decides what each reason means: its HTTP CONNECT status, its
//! metric label, and which side of the tunnel failed.

/// Why a dial failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialReason {
    /// The destination refused the connection (nothing listens there).
    Refused,
    /// The destination did not answer in time (packets dropped, host down).
    Timeout,
    /// No route to the destination from the agent's network.
    NoRoute,
    /// The destination's name did not resolve.
    Dns,
    /// The agent or server ran out of a resource (file descriptors, its
    /// connection limit).
    Exhausted,
    /// No agent could take the dial (none connected, none for this host).
    NoAgent,
    /// The agent did not answer the server's dial request in time.
    AgentUnresponsive,
    /// The agent's stream ended while the dial was pending.
    AgentLost,
    /// The destination is outside `--allowed-destinations` (the agent's,
    /// or the server's for that agent).
    Forbidden,
    /// Anything else.
    Other,
}

/// Which part of the path failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The proxy-server (no agent, agent stream lost, limits).
    Server,
    /// The agent's own dial of the destination.
    Agent,
}

impl DialReason {
    /// Every reason, for tables and tests.
    pub const ALL: [DialReason; 10] = [
        DialReason::Refused,
        DialReason::Timeout,
        DialReason::NoRoute,
        DialReason::Dns,
        DialReason::Exhausted,
        DialReason::NoAgent,
        DialReason::AgentUnresponsive,
        DialReason::AgentLost,
        DialReason::Forbidden,
        DialReason::Other,
    ];

    /// Reads the reason from a dial error's text, the way a reference peer
    /// words it (and the way ours do, which use the same words).
    pub fn from_text(error: &str) -> DialReason {
        let e = error.to_ascii_lowercase();
        if e.contains("no agent available") || e.contains("no tunnels available") {
            DialReason::NoAgent
        } else if e.contains("no answer from agent") {
            DialReason::AgentUnresponsive
        } else if e.contains("went away while dialing") {
            DialReason::AgentLost
        } else if e.contains("not allowed by --allowed-destinations") {
            DialReason::Forbidden
        } else if e.contains("connection refused") {
            DialReason::Refused
        } else if e.contains("timeout")
            || e.contains("timed out")
            || e.contains("deadline exceeded")
        {
            DialReason::Timeout
        } else if e.contains("no route to host") || e.contains("network is unreachable") {
            DialReason::NoRoute
        } else if e.contains("no such host") || e.contains("lookup ") {
            DialReason::Dns
        } else if e.contains("too many open files") || e.contains("too many connections") {
            DialReason::Exhausted
        } else {
            DialReason::Other
        }
    }

    /// The wire value (`DialResponse.reason`); 0 means "not given".
    pub fn to_wire(self) -> i32 {
        match self {
            DialReason::Other => 1,
            DialReason::Refused => 2,
            DialReason::Timeout => 3,
            DialReason::NoRoute => 4,
            DialReason::Dns => 5,
            DialReason::Exhausted => 6,
            DialReason::NoAgent => 7,
            DialReason::AgentUnresponsive => 8,
            DialReason::AgentLost => 9,
            DialReason::Forbidden => 10,
        }
    }

    /// The reason for a wire value; `None` for 0 (not given). A value from a
    /// newer peer that we do not know reads as [`DialReason::Other`].
    pub fn from_wire(v: i32) -> Option<DialReason> {
        match v {
            0 => None,
            2 => Some(DialReason::Refused),
            3 => Some(DialReason::Timeout),
            4 => Some(DialReason::NoRoute),
            5 => Some(DialReason::Dns),
            6 => Some(DialReason::Exhausted),
            7 => Some(DialReason::NoAgent),
            8 => Some(DialReason::AgentUnresponsive),
            9 => Some(DialReason::AgentLost),
            10 => Some(DialReason::Forbidden),
            _ => Some(DialReason::Other),
        }
    }

    /// A short label (metrics, JSON, the CONNECT reason header).
    pub fn as_str(self) -> &'static str {
        match self {
            DialReason::Refused => "refused",
            DialReason::Timeout => "timeout",
            DialReason::NoRoute => "no_route",
            DialReason::Dns => "dns",
            DialReason::Exhausted => "exhausted",
            DialReason::NoAgent => "no_agent",
            DialReason::AgentUnresponsive => "agent_unresponsive",
            DialReason::AgentLost => "agent_lost",
            DialReason::Forbidden => "forbidden",
            DialReason::Other => "other",
        }
    }

    /// The reason for a label from [`DialReason::as_str`].
    pub fn parse(s: &str) -> Option<DialReason> {
        DialReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The HTTP CONNECT status for this reason. For the agent's reasons this is
    /// what the reference chooses from the text (timeouts 504, descriptor
    /// exhaustion 503, everything else 502); for the server's own: no agent
    /// 500 (the reference's), no answer in time 504, stream lost 502.
    pub fn http_status(self) -> u16 {
        match self {
            DialReason::Timeout | DialReason::AgentUnresponsive => 504,
            DialReason::Exhausted => 503,
            DialReason::NoAgent => 500,
            DialReason::Forbidden => 403,
            DialReason::Refused
            | DialReason::NoRoute
            | DialReason::Dns
            | DialReason::AgentLost
            | DialReason::Other => 502,
        }
    }

    /// Which side failed.
    pub fn side(self) -> Side {
        match self {
            DialReason::NoAgent | DialReason::AgentUnresponsive | DialReason::AgentLost => {
                Side::Server
            }
            _ => Side::Agent,
        }
    }
}

impl std::fmt::Display for DialReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_reference_texts() {
        let cases = [
            (
                "dial tcp 10.0.0.5:10250: connect: connection refused",
                DialReason::Refused,
            ),
            ("dial tcp 10.0.0.5:10250: i/o timeout", DialReason::Timeout),
            (
                "dial tcp 10.0.0.5:10250: connect: no route to host",
                DialReason::NoRoute,
            ),
            (
                "dial tcp 10.0.0.5:10250: connect: network is unreachable",
                DialReason::NoRoute,
            ),
            (
                "dial tcp: lookup nowhere.example: no such host",
                DialReason::Dns,
            ),
            (
                "dial tcp 10.0.0.5:1: socket: too many open files",
                DialReason::Exhausted,
            ),
            ("No agent available", DialReason::NoAgent),
            (
                "dial timeout: no answer from agent a within 10s",
                DialReason::AgentUnresponsive,
            ),
            ("tls: bad certificate", DialReason::Other),
        ];
        for (text, want) in cases {
            assert_eq!(DialReason::from_text(text), want, "{text}");
        }
    }

    #[test]
    fn wire_and_labels_round_trip() {
        assert_eq!(DialReason::from_wire(0), None);
        assert_eq!(DialReason::from_wire(999), Some(DialReason::Other));
        for r in DialReason::ALL {
            assert_eq!(DialReason::from_wire(r.to_wire()), Some(r));
            assert_eq!(DialReason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn statuses_match_the_reference_text_mapping() {
        assert_eq!(DialReason::Timeout.http_status(), 504);
        assert_eq!(DialReason::Exhausted.http_status(), 503);
        assert_eq!(DialReason::Refused.http_status(), 502);
        assert_eq!(DialReason::Dns.http_status(), 502);
        assert_eq!(DialReason::Refused.side(), Side::Agent);
        assert_eq!(DialReason::NoAgent.side(), Side::Server);
    }
}
