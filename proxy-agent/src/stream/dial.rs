//! Carrying out the server's dials: connecting under `--allowed-destinations`
//! and `--dial-timeout`, answering with the reference agent's error texts,
//! and relaying each destination connection's bytes until either side
//! closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use konnectivity_proto::policy::Destinations;
use konnectivity_proto::{packet, DialReason};
use konnectivity_relay::{self as relay, ConnInbox, ConnInfo, Credit, Inbound, Slot};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::ServerLink;

/// How long a closing connection keeps moving what was sent before the close:
/// the destination's last bytes after it reset the connection (our write to
/// it failed), or the client's last bytes after the server closed it. Both
/// normally take no time; this bounds a peer that keeps sending or stops
/// reading.
pub(super) const CLOSE_DRAIN: Duration = Duration::from_secs(5);

impl ServerLink {
    pub(super) async fn dial(
        self: Arc<Self>,
        address: String,
        random: i64,
        cancel: CancellationToken,
    ) {
        let cfg = &self.settings.config;
        let m = self.metrics().clone();
        let started = Instant::now();
        let result = tokio::select! {
            // Boxed: the connect state (resolver included) is freed once the
            // dial is done instead of sizing the long-lived relay task.
            r = Box::pin(tokio::time::timeout(cfg.dial_timeout, connect(&address, &cfg.allowed))) => r,
            _ = cancel.cancelled() => {
                self.take_dial(random);
                debug!("dial aborted");
                return;
            }
        };
        m.dial_duration.observe(started.elapsed().as_secs_f64());
        let Some(pending) = self.take_dial(random) else {
            debug!("dial finished after it was cancelled; dropped");
            return;
        };
        let tcp = match outcome(&address, result, cfg) {
            Ok(tcp) => tcp,
            Err((reason, text)) => {
                self.dial_failed(&address, random, reason, text).await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (conn, inbox) = relay::connection(self.flow, self.closed.child_token(), None);
        let (credit, kill) = (conn.credit.clone(), conn.kill.clone());
        let info = ConnInfo::new(&address, &self.server_id);
        let slot = Slot {
            conn,
            info: info.clone(),
        };
        let connected = self.state().connected(pending, slot);
        let Ok((connect_id, _, answer)) = connected else {
            let text = "too many connections on this agent stream".to_string();
            self.dial_failed(&address, random, DialReason::Exhausted, text)
                .await;
            return;
        };
        m.open_endpoint_connections.inc();
        tracing::Span::current().record("connect_id", connect_id);
        if !self.send_control(answer).await {
            return;
        }
        debug!("connected");
        self.relay(tcp, connect_id, inbox, credit, kill, info).await;
    }

    /// Answers a failed dial: counted, logged, and its reason typed for a
    /// server that speaks `dial-reason-v1`.
    async fn dial_failed(&self, address: &str, random: i64, reason: DialReason, text: String) {
        self.count_failure(address, reason, &text);
        let typed = self.dial_reason.then_some(reason);
        self.send_control(packet::dial_failed_with(random, text, typed))
            .await;
    }

    /// Counts and logs a failed dial, and records it for the admin endpoint.
    pub(super) fn count_failure(&self, address: &str, reason: DialReason, text: &str) {
        // The reference's label values, and ours for a policy refusal.
        let label = match reason {
            DialReason::Timeout => "timeout",
            DialReason::Forbidden => "forbidden",
            _ => "unknown",
        };
        self.metrics()
            .endpoint_dial_failures
            .with_label_values(&[label])
            .inc();
        info!(%reason, error = text, "dial failed");
        self.settings
            .events
            .dial_failed(address, &self.server_id, reason, text);
    }

    async fn relay(
        self: Arc<Self>,
        tcp: TcpStream,
        connect_id: i64,
        inbox: ConnInbox,
        credit: Arc<Credit>,
        kill: CancellationToken,
        info: Arc<ConnInfo>,
    ) {
        let (reader, writer) = tcp.into_split();
        let up = relay::socket_to_tunnel(reader, &credit, |b: Bytes| {
            let n = b.len() as u64;
            let link = self.clone();
            let info = info.clone();
            async move {
                let ok = link.send(packet::data(connect_id, b)).await;
                link.metrics()
                    .bytes
                    .with_label_values(&["to_server"])
                    .inc_by(n);
                info.sent(n);
                ok
            }
        });
        let mut inbound = ConnInbound {
            link: self.clone(),
            connect_id,
            inbox,
            info: info.clone(),
        };
        let down = relay::tunnel_to_socket(&mut inbound, writer);
        tokio::pin!(up, down);
        tokio::select! {
            _ = kill.cancelled() => {
                // Closed by the server (the client hung up): what the
                // client sent before that is queued and still goes to the
                // destination, as TCP would deliver it before the FIN.
                let _ = tokio::time::timeout(CLOSE_DRAIN, &mut down).await;
            }
            r = &mut up => if let Err(e) = r { debug!(error = %e, "destination read failed") },
            r = &mut down => if let Err(e) = r {
                debug!(error = %e, "destination write failed");
                // A destination that closed while bytes to it were still
                // coming is reset by its kernel, and our write fails; what
                // it wrote before closing is still in our socket and must
                // go out first (an `exec` command's last output).
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = tokio::time::sleep(CLOSE_DRAIN) => {}
                    r = &mut up => if let Err(e) = r { debug!(error = %e, "destination read failed") },
                }
            },
        }
        // The destination closed, or failed: tell the server, unless the
        // server closed it first.
        if let Some(close) = self.close_conn(connect_id) {
            self.send(close).await;
        }
        debug!("closed");
    }
}

struct ConnInbound {
    link: Arc<ServerLink>,
    connect_id: i64,
    inbox: ConnInbox,
    info: Arc<ConnInfo>,
}

impl Inbound for ConnInbound {
    async fn recv(&mut self) -> Option<Bytes> {
        self.inbox.recv().await
    }

    async fn delivered(&mut self, n: usize) {
        self.link
            .metrics()
            .bytes
            .with_label_values(&["to_endpoint"])
            .inc_by(n as u64);
        self.info.delivered(n as u64);
        if let Some(g) = self.inbox.written(n) {
            self.link
                .send_control(packet::window(self.connect_id, g))
                .await;
        }
    }
}

/// The destination connection, or why there is none and the error text the
/// reference agent would give.
pub(super) fn outcome(
    address: &str,
    result: Result<Result<TcpStream, Dial>, tokio::time::error::Elapsed>,
    cfg: &crate::config::Config,
) -> Result<TcpStream, (DialReason, String)> {
    match result {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(Dial::Forbidden)) => Err((
            DialReason::Forbidden,
            format!(
                "dial tcp {address}: not allowed by --allowed-destinations on the agent ({})",
                cfg.allowed
            ),
        )),
        Ok(Err(Dial::Io(e))) => Err(dial_error_text(address, &e)),
        Err(_) => Err((
            DialReason::Timeout,
            format!("dial tcp {address}: i/o timeout"),
        )),
    }
}

/// Why [`connect`] did not connect.
pub(super) enum Dial {
    /// No address of the destination is allowed.
    Forbidden,
    Io(std::io::Error),
}

/// Connects to `address` (`host:port`), trying only the addresses `allowed`
/// lets through, in the resolver's order; the last error if none answers.
pub(super) async fn connect(address: &str, allowed: &Destinations) -> Result<TcpStream, Dial> {
    if allowed.allows_all() {
        return TcpStream::connect(address).await.map_err(Dial::Io);
    }
    let addrs = tokio::net::lookup_host(address).await.map_err(Dial::Io)?;
    let mut last = None;
    for a in addrs.filter(|a| allowed.allows(*a)) {
        match TcpStream::connect(a).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map(Dial::Io).unwrap_or(Dial::Forbidden))
}

/// The dial error as the reference agent words it (Go's net errors), so that
/// HTTP CONNECT status mapping and humans see the familiar text; and its
/// reason.
fn dial_error_text(address: &str, e: &std::io::Error) -> (DialReason, String) {
    use std::io::ErrorKind::*;
    let text = e.to_string();
    if text.contains("failed to lookup address") {
        let host = konnectivity_proto::metadata::dest_host(address);
        return (
            DialReason::Dns,
            format!("dial tcp: lookup {host}: no such host"),
        );
    }
    let (reason, what) = match e.kind() {
        ConnectionRefused => (DialReason::Refused, "connect: connection refused".into()),
        TimedOut => (DialReason::Timeout, "i/o timeout".into()),
        HostUnreachable => (DialReason::NoRoute, "connect: no route to host".into()),
        NetworkUnreachable => (
            DialReason::NoRoute,
            "connect: network is unreachable".into(),
        ),
        _ if e.raw_os_error() == Some(24) => {
            (DialReason::Exhausted, "socket: too many open files".into())
        }
        _ => (DialReason::Other, text),
    };
    (reason, format!("dial tcp {address}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::dial_error_text;
    use konnectivity_proto::DialReason;
    use std::io::{Error, ErrorKind};

    #[test]
    fn dial_errors_read_like_the_reference_agent() {
        let refused = Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(
            dial_error_text("10.0.0.5:10250", &refused),
            (
                DialReason::Refused,
                "dial tcp 10.0.0.5:10250: connect: connection refused".into()
            )
        );
        let timeout = Error::from(ErrorKind::TimedOut);
        assert_eq!(dial_error_text("a:1", &timeout).0, DialReason::Timeout);
        // The reason read back from the text is the typed one.
        for e in [refused, timeout] {
            let (reason, text) = dial_error_text("10.0.0.5:10250", &e);
            assert_eq!(DialReason::from_text(&text), reason);
        }
        let dns = Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(
            dial_error_text("nowhere.example:80", &dns).1,
            "dial tcp: lookup nowhere.example: no such host"
        );
    }
}
