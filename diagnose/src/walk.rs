//! The walk: each hop in turn, within one deadline, stopping at the first
//! broken one.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use konnectivity_client::{DialReason, Error, Frontend, Mode, Stage, Transport};

use crate::egress::{self, Egress, Where};
use crate::kubelet::{self, KubeletTls};
use crate::report::{Check, Hop, Report, Status};
use crate::server::{self, ServerView};

/// What the walk needs.
pub struct Plan {
    /// `host:port` of the kubelet.
    pub target: String,
    /// The kubelet's host (for its certificate name).
    pub host: String,
    /// Where the target came from, for the report.
    pub target_source: String,
    /// `--egress-selector-config-file`.
    pub egress_file: Option<PathBuf>,
    /// The frontend from flags, when no file is given.
    pub frontend_flags: Option<(Mode, Where)>,
    /// The server's admin endpoint (`host:port`).
    pub admin: String,
    /// kube-apiserver's kubelet TLS settings.
    pub kubelet_tls: KubeletTls,
    /// The whole run's limit, counted from the process's start.
    pub timeout: Duration,
}

/// Time left before `deadline`, never below a small floor so a hop still
/// gets to report.
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(50))
}

fn transport_for(w: &Where) -> Result<Transport, String> {
    Ok(match w {
        Where::Unix(p) => Transport::Unix(p.clone()),
        Where::Tls {
            addr,
            host,
            ca,
            cert,
            key,
        } => {
            let ca = ca.as_deref().ok_or(
                "tlsConfig.caBundle is not set (this command needs it to verify the server)",
            )?;
            let config = konnectivity_runtime::tls::client_config(
                ca,
                Some((cert.as_path(), key.as_path())),
                &[],
            )
            .map_err(|e| e.to_string())?;
            let server_name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("server name {host:?}: {e}"))?;
            Transport::Tls {
                addr: addr.clone(),
                server_name,
                config,
            }
        }
    })
}

fn where_line(mode: Mode, w: &Where) -> String {
    match w {
        Where::Unix(p) => format!("{mode} over the Unix socket {}", p.display()),
        Where::Tls { addr, .. } => format!("{mode} over mutual-TLS TCP to {addr}"),
    }
}

/// Hop 1.
fn egress_check(plan: &Plan) -> (Check, Option<(Mode, Where)>) {
    let (source, egress) = match (&plan.egress_file, &plan.frontend_flags) {
        (Some(path), _) => match egress::load(path) {
            Ok(e) => (path.display().to_string(), e),
            Err(why) => {
                let c = Check::new(Hop::EgressConfig, Status::Failed, "kube-apiserver would reject it")
                    .evidence(format!("{}: {why}", path.display()))
                    .next("fix the file kube-apiserver's --egress-selector-config-file points at; kube-apiserver does not start with an invalid one");
                return (c, None);
            }
        },
        (None, Some((mode, w))) => (
            "flags".to_string(),
            Egress::Proxy {
                mode: *mode,
                transport: w.clone(),
            },
        ),
        (None, None) => {
            let c = Check::new(Hop::EgressConfig, Status::Failed, "no egress configuration given")
                .next("pass kube-apiserver's --egress-selector-config-file, or --uds-name / --server-address with --mode");
            return (c, None);
        }
    };
    let (mode, w) = match egress {
        Egress::Direct => {
            let c = Check::new(
                Hop::EgressConfig,
                Status::Failed,
                "the cluster egress selection is Direct (or absent): kube-apiserver dials kubelets itself, not through the tunnel",
            )
            .evidence(source)
            .next("add an egressSelections entry named cluster with proxyProtocol GRPC or HTTPConnect");
            return (c, None);
        }
        Egress::Proxy { mode, transport } => (mode, transport),
    };
    let missing = egress::missing_files(&w);
    if !missing.is_empty() {
        let mut c = Check::new(
            Hop::EgressConfig,
            Status::Failed,
            format!(
                "it names {} that do not exist",
                if missing.len() == 1 {
                    "a file"
                } else {
                    "files"
                }
            ),
        )
        .evidence(format!("{source}: {}", where_line(mode, &w)));
        for m in missing {
            c = c.evidence(m);
        }
        c = c.next("compare the path with proxy-server's --uds-name (and the volume both containers mount); is proxy-server running?");
        return (c, None);
    }
    let c = Check::new(Hop::EgressConfig, Status::Ok, where_line(mode, &w))
        .evidence(format!("from {source}"));
    (c, Some((mode, w)))
}

/// Hop 2 (or a later hop's failure that turns out to be the frontend's).
fn frontend_failed(e: &Error) -> Check {
    let mut c = Check::new(Hop::Frontend, Status::Failed, e.to_string());
    c = match e {
        Error::Connect { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => c.next(
                "proxy-server is not running or listens elsewhere: check its pod and its --uds-name / --server-port",
            ),
            std::io::ErrorKind::PermissionDenied => c.next("this user may not open the socket: run as the user kube-apiserver runs as, or check the socket's mode"),
            _ => c.next("check proxy-server's pod and its listen flags"),
        },
        Error::Tls { .. } => c.next(
            "the server and the egress configuration's tlsConfig disagree: caBundle must sign the server's --server-cert, and the server's --server-ca-cert must sign clientCert",
        ),
        Error::Protocol { .. } => c.next(
            "the server speaks another mode: proxyProtocol (GRPC or HTTPConnect) must match proxy-server's --mode",
        ),
        Error::Timeout { .. } => c.next("the server accepted but did not answer: is it overloaded or stuck? check its logs and /readyz"),
        Error::Dial { .. } => c,
    };
    c
}

/// Hop 3 or 4 for a failed dial.
pub fn dial_failed(e: &Error, view: &ServerView, target: &str) -> Check {
    match e {
        Error::Dial {
            message,
            reason,
            typed,
            status,
            ..
        } => {
            let how = format!(
                "{}{}",
                if *typed { "reason from the server" } else { "reason read from the text" },
                status.map(|s| format!(", HTTP {s}")).unwrap_or_default()
            );
            match reason {
                DialReason::NoAgent => Check::new(Hop::Server, Status::Failed, format!("no agent can reach {target}"))
                    .evidence(format!("server: {message} ({how})"))
                    .next("check that an agent runs on the node and connected (its logs), and its --agent-identifiers against --proxy-strategies"),
                DialReason::AgentUnresponsive | DialReason::AgentLost => Check::new(
                    Hop::Server,
                    Status::Failed,
                    "the agent chosen for the dial did not answer",
                )
                .evidence(format!("server: {message} ({how})"))
                .next("check the agent's logs; a partitioned agent is dropped once its heartbeat fails"),
                DialReason::Refused => Check::new(Hop::Dial, Status::Failed, format!("the node refused the connection to {target}"))
                    .evidence(format!("agent: {message} ({how})"))
                    .next("nothing listens on that address and port on the node: is the kubelet running? does the node's kubelet port match?"),
                DialReason::Timeout => Check::new(Hop::Dial, Status::Failed, format!("{target} did not answer the agent's dial"))
                    .evidence(format!("agent: {message} ({how})"))
                    .next("a firewall or network policy on the node drops the traffic, or the address is not the node's"),
                DialReason::NoRoute => Check::new(Hop::Dial, Status::Failed, format!("the agent has no route to {target}"))
                    .evidence(format!("agent: {message} ({how})"))
                    .next("the agent runs where that address is not reachable: check hostNetwork on the agent DaemonSet and the node's addresses"),
                DialReason::Dns => Check::new(Hop::Dial, Status::Failed, format!("the agent could not resolve {target}"))
                    .evidence(format!("agent: {message} ({how})"))
                    .next("kube-apiserver dials a node name: set --kubelet-preferred-address-types=InternalIP,... or make the name resolvable on the node"),
                DialReason::Exhausted => Check::new(Hop::Dial, Status::Failed, "the agent or server is out of resources")
                    .evidence(format!("{message} ({how})"))
                    .next("check open file limits and --max-connections on the agent"),
                DialReason::Forbidden => {
                    // The text says whose list refused it.
                    let hop = if message.contains("on the server") { Hop::Server } else { Hop::Dial };
                    Check::new(hop, Status::Failed, format!("{target} is outside the allowed destinations"))
                        .evidence(format!("{message} ({how})"))
                        .next("add the node's address and kubelet port to --allowed-destinations (or --agent-allowed-destinations on the server)")
                }
                DialReason::Other => Check::new(Hop::Dial, Status::Failed, format!("the dial of {target} failed"))
                    .evidence(format!("{message} ({how})")),
            }
        }
        Error::Timeout {
            stage: Stage::Dial,
            after,
        } => match &view.agent {
            Some((id, silent)) if *silent < server::SILENT.as_secs_f64() => Check::new(
                Hop::Dial,
                Status::Failed,
                format!("{target} did not answer within {after:?}"),
            )
            .evidence(format!(
                "agent {id} is connected (last packet {silent:.1} s ago) and took the dial, but no answer came"
            ))
            .next("a firewall or drop rule on the node swallows the kubelet's traffic, or the address is not the node's"),
            _ => Check::new(
                Hop::Server,
                Status::Failed,
                format!("no answer to the dial within {after:?}"),
            )
            .evidence("the server's admin endpoint was not available to tell whether the agent is alive")
            .next("check the server's and the agent's logs for this destination"),
        },
        other => frontend_failed(other),
    }
}

/// Runs every hop within `plan.timeout` of `started` (the start of the
/// process, so reading the node counts too). Each hop gets what is left; if
/// one still hangs past the limit (a stage of the client, a read of the
/// admin endpoint), the run is cut there and that hop is reported broken.
pub async fn run(plan: Plan, started: Instant) -> Report {
    let deadline = started + plan.timeout;
    let mut report = Report {
        target: plan.target.clone(),
        target_source: plan.target_source.clone(),
        ..Report::default()
    };
    let mut at = (Hop::EgressConfig, Instant::now());
    // The hops aim at a deadline a little earlier, so a hop that reports its
    // own timeout does so before this cut.
    let walked = tokio::time::timeout_at(
        deadline.into(),
        walk(&plan, deadline - CUT_MARGIN, &mut report, &mut at),
    )
    .await;
    if walked.is_err() {
        let (hop, t) = at;
        let mut c = Check::new(
            hop,
            Status::Failed,
            format!("no answer within the run's {:?} limit", plan.timeout),
        )
        .next(match hop {
            Hop::Server => "the server's admin endpoint hangs: is the server overloaded or stopped (SIGSTOP, a full disk for logs)? check its logs",
            Hop::Frontend => "the server accepted but did not answer: is it overloaded or stuck? check its logs and /readyz",
            _ => "run again with a longer --timeout to see where it ends",
        });
        c.took = t.elapsed();
        report.checks.retain(|k| k.hop < hop);
        report.checks.push(c);
    }
    report.took = started.elapsed();
    report
}

/// How much earlier than the run's cut the hops aim to end.
const CUT_MARGIN: Duration = Duration::from_millis(150);

/// The hops in order; `at` says which one runs (for a run cut short).
/// Returns early at the first broken hop.
async fn walk(plan: &Plan, deadline: Instant, report: &mut Report, at: &mut (Hop, Instant)) {
    // Records a hop; a failed one ends the walk.
    macro_rules! push {
        ($check:expr) => {{
            let mut c = $check;
            c.took = at.1.elapsed();
            let failed = c.status == Status::Failed;
            report.checks.push(c);
            if failed {
                return;
            }
        }};
    }
    macro_rules! begin {
        ($hop:expr) => {
            *at = ($hop, Instant::now());
        };
    }

    // 1. The egress configuration.
    begin!(Hop::EgressConfig);
    let (c, found) = egress_check(plan);
    push!(c);
    let Some((mode, w)) = found else {
        return;
    };

    // 2. The frontend.
    begin!(Hop::Frontend);
    let transport = match transport_for(&w) {
        Ok(tr) => tr,
        Err(why) => {
            push!(Check::new(
                Hop::Frontend,
                Status::Failed,
                "the TLS settings cannot be used"
            )
            .evidence(why));
            return;
        }
    };
    let frontend = Frontend::new(mode, transport.clone()).timeout(left(deadline));
    match frontend.reach().await {
        Ok(()) => push!(Check::new(
            Hop::Frontend,
            Status::Ok,
            format!("{} answers", transport.target())
        )
        .evidence(match mode {
            Mode::Grpc => "a gRPC server answered a probe call (UNIMPLEMENTED, as expected)",
            Mode::HttpConnect => "connection accepted (the CONNECT itself is checked by the dial)",
        })),
        Err(e) => push!(frontend_failed(&e)),
    }

    // 3. The server's view.
    begin!(Hop::Server);
    let admin_limit = left(deadline).min(Duration::from_millis(1500));
    let route_path = format!("/debug/route?address={}", plan.target);
    let view = match server::get(&plan.admin, &route_path, admin_limit).await {
        Ok((200, route)) => {
            let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
            // Together: each read is bounded, and so is their sum.
            let admin_limit = left(deadline).min(Duration::from_millis(1500));
            let (ready, agents, events) = tokio::join!(
                server::get(&plan.admin, "/readyz", admin_limit),
                server::get(&plan.admin, "/debug/agents", admin_limit),
                server::get(&plan.admin, "/debug/events", admin_limit),
            );
            let ready = ready.unwrap_or((0, String::new()));
            let agents = agents.map(|(_, b)| parse(&b)).unwrap_or_default();
            let events = events.map(|(_, b)| parse(&b)).unwrap_or_default();
            let (c, view) = server::judge(
                &plan.target,
                (ready.0, &ready.1),
                &parse(&route),
                &agents,
                &events,
            );
            push!(c);
            view
        }
        Ok((status, _)) => {
            push!(Check::new(
                Hop::Server,
                Status::Skipped,
                format!(
                    "the admin endpoint {} has no diagnostics (HTTP {status}): a reference server?",
                    plan.admin
                )
            ));
            ServerView::default()
        }
        Err(why) => {
            push!(Check::new(
                Hop::Server,
                Status::Skipped,
                format!("the admin endpoint is not reachable: {why}")
            )
            .next("pass --admin-address (proxy-server's --admin-bind-address:--admin-port) to see its agents"));
            ServerView::default()
        }
    };

    // 4. The dial.
    begin!(Hop::Dial);
    let frontend = frontend.timeout(left(deadline));
    let tunnel = match frontend.dial(&plan.target).await {
        Ok(tunnel) => {
            push!(Check::new(
                Hop::Dial,
                Status::Ok,
                format!("connected to {}", plan.target)
            ));
            tunnel
        }
        Err(e) => {
            let c = dial_failed(&e, &view, &plan.target);
            // A server-side failure replaces a hop 3 that looked fine.
            report.checks.retain(|k| k.hop < c.hop);
            push!(c);
            return;
        }
    };

    // 5. TLS to the kubelet.
    begin!(Hop::KubeletTls);
    let hs = kubelet::handshake(tunnel, &plan.host, &plan.kubelet_tls, left(deadline)).await;
    let verified = plan.kubelet_tls.roots.is_some();
    let verdict = kubelet::tls_check(
        &hs.chain,
        hs.result.as_ref().map(drop),
        verified,
        &plan.host,
        SystemTime::now(),
    );
    push!(verdict);
    let Ok(mut tls) = hs.result else {
        return;
    };

    // 6. The request.
    begin!(Hop::KubeletRequest);
    let answer = kubelet::healthz(&mut tls, &plan.host, left(deadline)).await;
    let with_client = plan.kubelet_tls.client.is_some();
    push!(kubelet::request_check(
        answer,
        with_client,
        SystemTime::now()
    ));
}

/// The kube-apiserver TLS settings from flag paths.
pub fn kubelet_tls(
    ca: Option<&std::path::Path>,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<KubeletTls, String> {
    let roots = match ca {
        Some(p) => {
            let certs = konnectivity_runtime::tls::load_certs("kubelet CA", p)
                .map_err(|e| e.to_string())?;
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("kubelet CA {}: {e}", p.display()))?;
            }
            Some(roots)
        }
        None => None,
    };
    let client = match client {
        Some((cert, key)) => Some((
            konnectivity_runtime::tls::load_certs("kubelet client certificate", cert)
                .map_err(|e| e.to_string())?,
            konnectivity_runtime::tls::load_key("kubelet client key", key)
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    Ok(KubeletTls { roots, client })
}

#[cfg(test)]
mod tests;
