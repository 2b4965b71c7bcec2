//! `AgentService.Connect`: authenticates an agent stream, answers with
//! `serverID`/`serverCount`, registers it, and serves it until it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use konnectivity_proto::grpc::{self, Incoming, Replies};
use konnectivity_proto::metadata::{self, AgentIdentifiers};
use konnectivity_proto::packet;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn, Instrument};

use super::agent::{AgentLink, LinkSettings, OUT_QUEUE};
use super::auth::AgentAuth;
use super::registry::AgentRegistry;
use crate::listen::PeerInfo;

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// The agent-facing gRPC service.
pub struct AgentEndpoint {
    /// Where streams are registered.
    pub registry: Arc<AgentRegistry>,
    /// Per-stream settings.
    pub settings: LinkSettings,
    /// Sent as `serverID`.
    pub server_id: String,
    /// Sent as `serverCount`.
    pub server_count: u32,
    /// Token authentication of agent streams.
    pub auth: AgentAuth,
    /// Offer `window-v1`.
    pub flow_control: bool,
    /// Offer QUIC on this UDP port.
    pub quic_port: Option<u16>,
    /// Cancelled to end every agent stream (immediate shutdown).
    pub stop: CancellationToken,
}

fn one_value<'a, T>(req: &'a Request<T>, key: &str) -> Result<Option<&'a str>, String> {
    let mut values = req.metadata().get_all(key).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(format!("several {key} values"));
    }
    first
        .map(|v| v.to_str().map_err(|_| format!("{key} is not text")))
        .transpose()
}

impl AgentEndpoint {
    fn refuse(
        &self,
        peer: &str,
        agent_id: Option<&str>,
        reason: &'static str,
        detail: String,
        code: tonic::Code,
    ) -> Status {
        self.settings
            .metrics
            .agent_refused
            .with_label_values(&[reason])
            .inc();
        warn!(peer, reason, detail, "agent stream refused");
        self.registry
            .events()
            .agent_refused(peer, agent_id, reason, &detail);
        Status::new(code, detail)
    }
}

impl grpc::Handler for AgentEndpoint {
    const SERVICE: &'static str = "AgentService";
    const METHOD: &'static str = konnectivity_proto::CONNECT_METHOD;

    async fn call(
        self: Arc<Self>,
        req: Request<Incoming<tonic::body::Body>>,
    ) -> Result<Response<Replies>, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.remote_addr.to_string())
            .unwrap_or_else(|| "unknown".into());
        let invalid = tonic::Code::InvalidArgument;
        let agent_id = match one_value(&req, metadata::AGENT_ID) {
            Ok(Some(id)) if !id.is_empty() => id.to_string(),
            Ok(_) => {
                return Err(self.refuse(
                    &peer,
                    None,
                    "no_agent_id",
                    "agentID metadata missing".into(),
                    invalid,
                ))
            }
            Err(e) => return Err(self.refuse(&peer, None, "bad_agent_id", e, invalid)),
        };
        let identifiers = match one_value(&req, metadata::AGENT_IDENTIFIERS) {
            Ok(None) => AgentIdentifiers::default(),
            Ok(Some(s)) => AgentIdentifiers::parse(s).map_err(|e| {
                self.refuse(
                    &peer,
                    Some(&agent_id),
                    "bad_identifiers",
                    format!("agent {agent_id}: {e}"),
                    invalid,
                )
            })?,
            Err(e) => {
                return Err(self.refuse(&peer, Some(&agent_id), "bad_identifiers", e, invalid))
            }
        };
        // Before serverID/serverCount go out: a refused agent learns nothing.
        let authorization: Vec<String> = req
            .metadata()
            .get_all(metadata::AUTHORIZATION)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .collect();
        let values: Vec<&str> = authorization.iter().map(String::as_str).collect();
        match self.auth.check(&values).await {
            Ok(Some(user)) => debug!(agent.id = %agent_id, %user, "agent token accepted"),
            Ok(None) => {}
            Err(e) => {
                let code = if e.is_transient() {
                    tonic::Code::Unavailable
                } else {
                    tonic::Code::Unauthenticated
                };
                return Err(self.refuse(
                    &peer,
                    Some(&agent_id),
                    e.reason(),
                    format!("agent {agent_id}: {e}"),
                    code,
                ));
            }
        }
        drop(authorization);
        let features = one_value(&req, metadata::FEATURES).ok().flatten();
        let flow =
            self.flow_control && metadata::has_feature(features, metadata::FEATURE_FLOW_CONTROL);
        let dial_reason = metadata::has_feature(features, metadata::FEATURE_DIAL_REASON);
        let quic_port = self
            .quic_port
            .filter(|_| metadata::has_feature(features, konnectivity_quic::FEATURE));

        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let link = Arc::new(AgentLink::new(
            serial,
            agent_id.clone(),
            identifiers,
            flow,
            peer.clone(),
            out_tx,
            self.settings.clone(),
        ));
        let span = tracing::info_span!("agent", agent.id = %agent_id, stream = serial, %peer);
        span.in_scope(|| info!(identifiers = %link.identifiers.encode(), flow_control = flow, quic_offered = quic_port.is_some(), "agent stream connected"));
        self.registry.add(link.clone());

        let registry = self.registry.clone();
        let stop = self.stop.clone();
        let inbound = req.into_inner();
        let served = link.clone();
        tokio::spawn(
            async move {
                // Ended by the server's shutdown, or when the agent stops
                // answering heartbeats.
                let stop = stop.child_token();
                if served.flow {
                    tokio::spawn(heartbeat(served.clone(), stop.clone()).in_current_span());
                }
                if let Some(mistake) = served.clone().serve(inbound, stop).await {
                    registry.events().agent_refused(
                        &served.peer,
                        Some(&served.agent_id),
                        "cut_off",
                        &format!("stream ended after too many protocol mistakes (last: {mistake})"),
                    );
                }
                registry.remove(served.serial);
            }
            .instrument(span),
        );

        // End the response when the stream's state ends, even while tunnels
        // still hold the sending side.
        let ended = link.closed.clone().cancelled_owned();
        let stream: Replies =
            Box::pin(futures::StreamExt::take_until(ReceiverStream::new(out_rx), ended).map(Ok));
        let mut resp = Response::new(stream);
        let md = resp.metadata_mut();
        let ascii = |s: &str| {
            s.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
                .map_err(|_| Status::internal("metadata value is not ASCII"))
        };
        md.insert(metadata::SERVER_ID, ascii(&self.server_id)?);
        md.insert(
            metadata::SERVER_COUNT,
            ascii(&self.server_count.to_string())?,
        );
        let answered: Vec<&str> = [
            flow.then_some(metadata::FEATURE_FLOW_CONTROL),
            dial_reason.then_some(metadata::FEATURE_DIAL_REASON),
            quic_port.map(|_| konnectivity_quic::FEATURE),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !answered.is_empty() {
            md.insert(metadata::FEATURES, ascii(&answered.join(","))?);
        }
        if let Some(port) = quic_port {
            md.insert(konnectivity_quic::PORT_HEADER, ascii(&port.to_string())?);
            md.insert(konnectivity_quic::TICKET_HEADER, ascii(&link.ticket)?);
        }
        Ok(resp)
    }
}

/// With `window-v1` the server sends a heartbeat every
/// [`metadata::HEARTBEAT_INTERVAL`] and the agent answers each; a stream that
/// brings nothing from the agent for [`metadata::HEARTBEAT_MISSES`] intervals
/// is dropped (`silent`), so a partitioned agent is noticed in seconds, not
/// after the HTTP/2 keepalive's ping interval plus timeout.
async fn heartbeat(link: Arc<AgentLink>, silent: CancellationToken) {
    let watchdog = metadata::HEARTBEAT_INTERVAL * metadata::HEARTBEAT_MISSES;
    // Looks twice per interval, so silence is noticed within half an
    // interval of the watchdog.
    let mut tick = tokio::time::interval(metadata::HEARTBEAT_INTERVAL / 2);
    let mut beat = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = link.closed.cancelled() => return,
        }
        if link.silent_for(watchdog) {
            warn!(silence = ?watchdog, "no heartbeat answer from agent; dropping the stream");
            silent.cancel();
            return;
        }
        beat = !beat;
        if !beat {
            continue;
        }
        // A full queue towards the agent (a dead path fills it) must not
        // keep the watchdog from looking again.
        let sent = tokio::time::timeout(
            metadata::HEARTBEAT_INTERVAL / 2,
            link.send(packet::window(0, 0)),
        );
        if let Ok(false) = sent.await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::agent::test_link as link;
    use std::time::Duration;

    /// Paused time: an agent that stops answering is dropped after three
    /// missed heartbeats (6 s) and not before; one that answers each
    /// heartbeat is kept however long it is otherwise idle.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_drops_a_silent_agent_after_three_missed_heartbeats_only() {
        let watchdog = metadata::HEARTBEAT_INTERVAL * metadata::HEARTBEAT_MISSES;
        let (silent_link, mut rx) = link(1, "a", 64);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let silent = CancellationToken::new();
        let dog = tokio::spawn(heartbeat(silent_link.clone(), silent.clone()));
        tokio::time::sleep(watchdog - Duration::from_millis(100)).await;
        assert!(!silent.is_cancelled(), "dropped before {watchdog:?}");
        // Noticed within half an interval past the watchdog.
        tokio::time::sleep(metadata::HEARTBEAT_INTERVAL / 2 + Duration::from_millis(200)).await;
        assert!(silent.is_cancelled(), "not dropped after {watchdog:?}");
        dog.await.unwrap();
        drain.abort();

        // An agent that answers every heartbeat (its answer is a packet).
        let (alive_link, mut rx) = link(2, "b", 64);
        let answering = alive_link.clone();
        let answers = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                if matches!(
                    konnectivity_proto::Message::from_packet(p),
                    Ok(konnectivity_proto::Message::Window { connect_id: 0, .. })
                ) {
                    answering.liveness.seen();
                }
            }
        });
        let kept = CancellationToken::new();
        let dog = tokio::spawn(heartbeat(alive_link.clone(), kept.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!kept.is_cancelled(), "an answering agent was dropped");
        alive_link.closed.cancel();
        dog.await.unwrap();
        answers.abort();
    }
}
