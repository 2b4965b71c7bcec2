//! The verdict of a run: one entry per hop walked, the first broken hop, and
//! how it is printed (text for people, `-o json` for machines) and exited
//! with.

use std::time::Duration;

use serde_json::{json, Value};

/// The hops, in the order a request from kube-apiserver takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hop {
    /// The egress selector configuration file.
    EgressConfig = 1,
    /// The proxy-server's frontend (socket or TCP, mode, TLS).
    Frontend = 2,
    /// The proxy-server: ready, agents, the agent for this destination.
    Server = 3,
    /// The agent's dial of the kubelet.
    Dial = 4,
    /// TLS to the kubelet through the tunnel.
    KubeletTls = 5,
    /// A real request to the kubelet.
    KubeletRequest = 6,
}

impl Hop {
    /// Its number (1-6).
    pub fn number(self) -> u8 {
        self as u8
    }

    /// A short name (JSON, headings).
    pub fn name(self) -> &'static str {
        match self {
            Hop::EgressConfig => "egress-config",
            Hop::Frontend => "frontend",
            Hop::Server => "server",
            Hop::Dial => "dial",
            Hop::KubeletTls => "kubelet-tls",
            Hop::KubeletRequest => "kubelet-request",
        }
    }

    /// What the hop checks, for the text output.
    pub fn title(self) -> &'static str {
        match self {
            Hop::EgressConfig => "egress selector configuration",
            Hop::Frontend => "proxy-server frontend",
            Hop::Server => "proxy-server and its agents",
            Hop::Dial => "dial through the tunnel",
            Hop::KubeletTls => "TLS to the kubelet",
            Hop::KubeletRequest => "request to the kubelet",
        }
    }

    /// The process exit code when this hop is the broken one (10 + hop).
    pub fn exit_code(self) -> i32 {
        10 + self.number() as i32
    }
}

/// How a hop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Works.
    Ok,
    /// Works, with something worth knowing.
    Warn,
    /// Broken: the run stops here.
    Failed,
    /// Not checked (nothing to check, or not possible here).
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// One hop's result.
#[derive(Debug, Clone)]
pub struct Check {
    /// The hop.
    pub hop: Hop,
    /// How it went.
    pub status: Status,
    /// One line: what was found.
    pub summary: String,
    /// What was seen (addresses, errors in the peer's words, certificates).
    pub evidence: Vec<String>,
    /// What to check next, when it failed or warned.
    pub next: Vec<String>,
    /// How long the hop took.
    pub took: Duration,
}

impl Check {
    /// A hop result with no evidence yet.
    pub fn new(hop: Hop, status: Status, summary: impl Into<String>) -> Check {
        Check {
            hop,
            status,
            summary: summary.into(),
            evidence: Vec::new(),
            next: Vec::new(),
            took: Duration::ZERO,
        }
    }

    /// Adds evidence.
    pub fn evidence(mut self, e: impl Into<String>) -> Check {
        self.evidence.push(e.into());
        self
    }

    /// Adds a next step.
    pub fn next(mut self, n: impl Into<String>) -> Check {
        self.next.push(n.into());
        self
    }
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The destination (`host:port`) and how it was found.
    pub target: String,
    /// Where the destination came from (a node's addresses, or given).
    pub target_source: String,
    /// The hops walked, in order; the last is the broken one if any.
    pub checks: Vec<Check>,
    /// The whole run's time.
    pub took: Duration,
}

impl Report {
    /// The first broken hop.
    pub fn failed(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.status == Status::Failed)
    }

    /// 0 when every hop works; 10 + the broken hop's number otherwise.
    pub fn exit_code(&self) -> i32 {
        self.failed().map_or(0, |c| c.hop.exit_code())
    }

    /// The `-o json` document.
    pub fn json(&self) -> Value {
        json!({
            "target": self.target,
            "target_source": self.target_source,
            "healthy": self.failed().is_none(),
            "failed_hop": self.failed().map(|c| c.hop.name()),
            "exit_code": self.exit_code(),
            "took_ms": self.took.as_millis() as u64,
            "hops": self.checks.iter().map(|c| json!({
                "hop": c.hop.number(),
                "name": c.hop.name(),
                "status": c.status.as_str(),
                "summary": c.summary,
                "evidence": c.evidence,
                "next": c.next,
                "took_ms": c.took.as_millis() as u64,
            })).collect::<Vec<_>>(),
        })
    }

    /// The text for people.
    pub fn text(&self) -> String {
        let mut out = format!("Diagnosing {} ({})\n\n", self.target, self.target_source);
        for c in &self.checks {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Failed => "FAIL",
                Status::Skipped => "skip",
            };
            out.push_str(&format!(
                "[{mark}] {}. {}: {} ({} ms)\n",
                c.hop.number(),
                c.hop.title(),
                c.summary,
                c.took.as_millis()
            ));
            for e in &c.evidence {
                out.push_str(&format!("         {e}\n"));
            }
            for n in &c.next {
                out.push_str(&format!("         next: {n}\n"));
            }
        }
        out.push('\n');
        match self.failed() {
            Some(c) => out.push_str(&format!(
                "Broken at hop {} ({}): {}\n",
                c.hop.number(),
                c.hop.title(),
                c.summary
            )),
            None => out.push_str(&format!(
                "Healthy: kube-apiserver's path to {} works ({} ms).\n",
                self.target,
                self.took.as_millis()
            )),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_names_the_first_broken_hop() {
        let mut r = Report::default();
        r.checks
            .push(Check::new(Hop::EgressConfig, Status::Ok, "fine"));
        assert_eq!(r.exit_code(), 0);
        r.checks
            .push(Check::new(Hop::Server, Status::Failed, "no agent").evidence("agents: none"));
        assert_eq!(r.exit_code(), 13);
        assert_eq!(r.json()["failed_hop"], "server");
        assert!(r.text().contains("Broken at hop 3"), "{}", r.text());
        assert!(r.text().contains("agents: none"));
        for h in [
            Hop::EgressConfig,
            Hop::Frontend,
            Hop::Dial,
            Hop::KubeletRequest,
        ] {
            assert_eq!(h.exit_code(), 10 + h.number() as i32);
        }
    }
}
