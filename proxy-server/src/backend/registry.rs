//! The connected agent streams, and choosing one for a dial.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use konnectivity_proto::metadata::dest_host;
use konnectivity_proto::policy::Destinations;
use tracing::{debug, info};

use super::agent::AgentLink;
use super::strategy::Strategy;
use crate::diagnostics::Events;
use crate::metrics::Metrics;
use crate::tunnel::{DialError, Tunnel};

/// How long a new agent stream waits behind settled ones of the same
/// strategy (see [`AgentRegistry::pick`]).
pub const SETTLING: Duration = Duration::from_secs(1);

/// How many streams a dial tries when the chosen one ends before its request
/// is sent.
const PICK_ATTEMPTS: usize = 3;

/// All agent streams of this server.
pub struct AgentRegistry {
    links: RwLock<Vec<Arc<AgentLink>>>,
    strategies: Vec<Strategy>,
    rotate: AtomicUsize,
    dial_timeout: Duration,
    metrics: Metrics,
    events: Events,
    policy: DestinationPolicy,
}

/// The server's `--allowed-destinations` (for every agent) and
/// `--agent-allowed-destinations` (for one agent id, instead of the former).
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    /// For agents without their own list.
    pub default: Destinations,
    /// By agent id.
    pub per_agent: HashMap<String, Destinations>,
}

impl DestinationPolicy {
    /// The list that applies to `agent_id`.
    pub fn for_agent(&self, agent_id: &str) -> &Destinations {
        self.per_agent.get(agent_id).unwrap_or(&self.default)
    }
}

/// A stream chosen for a dial.
pub struct Choice {
    /// The stream.
    pub link: Arc<AgentLink>,
    /// The strategy that found it.
    pub strategy: Strategy,
}

impl AgentRegistry {
    /// An empty registry.
    pub fn new(strategies: Vec<Strategy>, dial_timeout: Duration, metrics: Metrics) -> Self {
        Self {
            links: RwLock::new(Vec::new()),
            strategies,
            rotate: AtomicUsize::new(0),
            dial_timeout,
            metrics,
            events: Events::default(),
            policy: DestinationPolicy::default(),
        }
    }

    /// Restricts where dials may go, per agent.
    pub fn with_policy(mut self, policy: DestinationPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Adds a stream.
    pub fn add(&self, link: Arc<AgentLink>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        links.push(link);
        self.metrics
            .ready_backend_connections
            .set(links.len() as i64);
    }

    /// Removes a stream.
    pub fn remove(&self, serial: u64) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        links.retain(|l| l.serial != serial);
        self.metrics
            .ready_backend_connections
            .set(links.len() as i64);
    }

    /// Number of connected streams.
    pub fn len(&self) -> usize {
        self.links.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// No agent connected?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live stream a QUIC hello's ticket names.
    pub fn by_ticket(&self, ticket: &str) -> Option<Arc<AgentLink>> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        links
            .iter()
            .find(|l| l.ticket == ticket && !l.closed.is_cancelled())
            .cloned()
    }

    /// Every stream (for shutdown and diagnostics).
    pub fn links(&self) -> Vec<Arc<AgentLink>> {
        self.links.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Picks a stream for `address`: strategies in order; within a strategy,
    /// non-draining streams first, then the least loaded, ties rotated so
    /// equal agents share the work. A stream younger than [`SETTLING`] is
    /// used only when no settled one matches: an agent that finds this server
    /// through a load balancer it already reached closes the extra stream as
    /// soon as it reads the server's id, and a dial sent on it would fail. A
    /// draining stream is used only when no strategy finds another.
    pub fn pick(&self, address: &str) -> Option<Arc<AgentLink>> {
        let start = self.rotate.fetch_add(1, Ordering::Relaxed);
        self.choose(address, start).map(|c| c.link)
    }

    /// Which stream a dial of `address` would take now, and by which
    /// strategy, without dialing (the admin endpoint's route answer).
    pub fn preview(&self, address: &str) -> Option<Choice> {
        let start = self.rotate.load(Ordering::Relaxed);
        self.choose(address, start)
    }

    /// The configured strategies, in order.
    pub fn strategies(&self) -> &[Strategy] {
        &self.strategies
    }

    /// The events the admin endpoint reports.
    pub fn events(&self) -> &Events {
        &self.events
    }

    fn choose(&self, address: &str, start: usize) -> Option<Choice> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        if links.is_empty() {
            return None;
        }
        let host = dest_host(address);
        let mut fallback = None;
        for strategy in &self.strategies {
            let matches = |l: &AgentLink| match strategy {
                Strategy::Default => true,
                Strategy::DestHost => l.identifiers.serves_host(host),
                Strategy::DefaultRoute => l.identifiers.default_route,
            };
            let n = links.len();
            let mut best: Option<&Arc<AgentLink>> = None;
            let mut young: Option<&Arc<AgentLink>> = None;
            for i in 0..n {
                let l = &links[(start + i) % n];
                if !matches(l) || l.closed.is_cancelled() {
                    continue;
                }
                if l.is_draining() {
                    fallback.get_or_insert_with(|| Choice {
                        link: l.clone(),
                        strategy: *strategy,
                    });
                    continue;
                }
                if l.liveness.age() < SETTLING {
                    young.get_or_insert(l);
                    continue;
                }
                if best.is_none_or(|b| l.load() < b.load()) {
                    best = Some(l);
                }
            }
            if let Some(b) = best.or(young) {
                debug!(?strategy, agent.id = %b.agent_id, "agent chosen");
                return Some(Choice {
                    link: b.clone(),
                    strategy: *strategy,
                });
            }
        }
        fallback
    }

    /// Dials `address` through a chosen agent. `random` is the dial id. If this
    /// future is dropped before the agent answers, the dial is abandoned
    /// (`DIAL_CLS` to the agent) and a late success is closed.
    pub async fn dial(
        &self,
        address: &str,
        random: i64,
        frontend: &'static str,
    ) -> Result<Tunnel, DialError> {
        let result = self.dial_inner(address, random, frontend).await;
        if let Err(e) = &result {
            if !matches!(e, DialError::Cancelled) {
                self.events.dial_failed(address, frontend, e);
            }
            // Reasons the agent reported are counted where the answer arrives.
            if !matches!(
                e,
                DialError::Agent { .. } | DialError::AgentGone(_) | DialError::DialClosed
            ) {
                self.metrics
                    .dial_failures
                    .with_label_values(&[e.reason()])
                    .inc();
            }
        }
        result
    }

    fn timed_out(&self, link: &AgentLink, address: &str) -> DialError {
        info!(agent.id = %link.agent_id, address, "agent did not answer the dial in time");
        DialError::Timeout {
            agent: link.agent_id.clone(),
            timeout: self.dial_timeout,
        }
    }

    async fn dial_inner(
        &self,
        address: &str,
        random: i64,
        frontend: &'static str,
    ) -> Result<Tunnel, DialError> {
        let mut attempt = 1;
        let (link, rx) = loop {
            let link = self.pick(address).ok_or(DialError::NoAgent)?;
            // The frontend's connection span declares `agent.id`: every line
            // of this dial and its connection names the agent, success or not.
            tracing::Span::current().record("agent.id", link.agent_id.as_str());
            let allowed = self.policy.for_agent(&link.agent_id);
            if !allowed.allows_target(address) {
                return Err(DialError::Forbidden {
                    agent: link.agent_id.clone(),
                    address: address.to_string(),
                    policy: allowed.to_string(),
                });
            }
            if let Some(conn) = link.quic() {
                // Its own QUIC stream; opening one waits only while the
                // agent has its limit of streams open. One deadline for both.
                let deadline = tokio::time::Instant::now() + self.dial_timeout;
                match tokio::time::timeout_at(deadline, conn.open_bi()).await {
                    Ok(Ok(streams)) => {
                        let dial = super::quic::dial(&link, streams, address, random, frontend);
                        return match tokio::time::timeout_at(deadline, dial).await {
                            Ok(r) => r,
                            Err(_) => Err(self.timed_out(&link, address)),
                        };
                    }
                    Ok(Err(e)) => {
                        debug!(agent.id = %link.agent_id, error = %e, "QUIC connection lost; dialing over the gRPC stream");
                        link.detach_quic(&conn);
                    }
                    Err(_) => return Err(self.timed_out(&link, address)),
                }
            }
            match link.begin_dial(address, random, frontend).await {
                Ok(rx) => break (link, rx),
                // The stream ended between the pick and the request (an agent
                // leaving, a rolling update): the agent never saw the dial,
                // and the next pick skips the ended stream.
                Err(DialError::AgentGone(agent)) if attempt < PICK_ATTEMPTS => {
                    debug!(agent.id = %agent, attempt, "chosen agent stream ended before the dial was sent; choosing again");
                    attempt += 1;
                }
                Err(e) => {
                    if matches!(e, DialError::AgentGone(_)) {
                        self.metrics
                            .dial_failures
                            .with_label_values(&[e.reason()])
                            .inc();
                    }
                    return Err(e);
                }
            }
        };
        struct Abandon<'a>(&'a Arc<AgentLink>, i64, bool);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if self.2 {
                    self.0.abandon_dial(self.1);
                }
            }
        }
        let mut abandon = Abandon(&link, random, true);
        let result = match tokio::time::timeout(self.dial_timeout, rx).await {
            Ok(Ok(r)) => r,
            // The reply was dropped without an answer: the stream is gone.
            Ok(Err(_)) => Err(DialError::AgentGone(link.agent_id.clone())),
            Err(_) => Err(self.timed_out(&link, address)),
        };
        // Answered (either way): nothing left to abandon unless we timed out.
        abandon.2 = matches!(result, Err(DialError::Timeout { .. }));
        result
    }
}

#[cfg(test)]
mod tests;
