//! The walk's verdicts and its deadline, against hops that answer, refuse or hang.

use super::*;

fn dial(reason: DialReason, message: &str) -> Error {
    Error::Dial {
        address: "10.0.0.5:10250".into(),
        message: message.into(),
        reason,
        typed: true,
        status: None,
    }
}

#[test]
fn each_dial_failure_names_its_hop() {
    let view = ServerView::default();
    let t = "10.0.0.5:10250";
    let cases = [
        (dial(DialReason::NoAgent, "No agent available"), Hop::Server),
        (
            dial(DialReason::AgentUnresponsive, "dial timeout"),
            Hop::Server,
        ),
        (
            dial(
                DialReason::Refused,
                "dial tcp 10.0.0.5:10250: connect: connection refused",
            ),
            Hop::Dial,
        ),
        (
            dial(DialReason::Timeout, "dial tcp 10.0.0.5:10250: i/o timeout"),
            Hop::Dial,
        ),
        (
            dial(DialReason::Dns, "dial tcp: lookup node-1: no such host"),
            Hop::Dial,
        ),
        (
            dial(
                DialReason::NoRoute,
                "dial tcp 10.0.0.5:10250: connect: no route to host",
            ),
            Hop::Dial,
        ),
        (
            dial(DialReason::Exhausted, "too many open files"),
            Hop::Dial,
        ),
        (
            dial(
                DialReason::Forbidden,
                "10.0.0.5:10250 is not in the allowed destinations on the server",
            ),
            Hop::Server,
        ),
        (
            dial(
                DialReason::Forbidden,
                "10.0.0.5:10250 is not in the agent's allowed destinations",
            ),
            Hop::Dial,
        ),
        (
            dial(
                DialReason::AgentLost,
                "agent node-1 went away while dialing",
            ),
            Hop::Server,
        ),
        (dial(DialReason::Other, "something else"), Hop::Dial),
        (
            Error::Protocol {
                target: "/x.sock".into(),
                mode: Mode::Grpc,
                detail: "h2 protocol error".into(),
            },
            Hop::Frontend,
        ),
        (
            Error::Timeout {
                stage: Stage::Answer,
                after: Duration::from_secs(1),
            },
            Hop::Frontend,
        ),
        (
            Error::Connect {
                target: "/x.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            },
            Hop::Frontend,
        ),
        (
            Error::Connect {
                target: "/x.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
            Hop::Frontend,
        ),
        (
            Error::Tls {
                target: "x".into(),
                detail: "received fatal alert: UnknownCA".into(),
            },
            Hop::Frontend,
        ),
    ];
    for (e, hop) in cases {
        let c = dial_failed(&e, &view, t);
        assert_eq!(c.hop, hop, "{e}");
        assert_eq!(c.status, Status::Failed);
    }
    let refused = dial_failed(&dial(DialReason::Refused, "connection refused"), &view, t);
    assert!(
        refused.evidence[0].contains("connection refused"),
        "{:?}",
        refused.evidence
    );
}

#[test]
fn a_dial_timeout_blames_the_node_only_when_the_agent_is_alive() {
    let e = Error::Timeout {
        stage: Stage::Dial,
        after: Duration::from_secs(4),
    };
    let alive = ServerView {
        agent: Some(("node-1".into(), 0.5)),
    };
    assert_eq!(dial_failed(&e, &alive, "x:1").hop, Hop::Dial);
    assert_eq!(
        dial_failed(&e, &ServerView::default(), "x:1").hop,
        Hop::Server
    );
}

fn plan(mode: Mode, socket: &std::path::Path, admin: String, timeout: Duration) -> Plan {
    Plan {
        target: "127.0.0.1:10250".into(),
        host: "127.0.0.1".into(),
        target_source: "given".into(),
        egress_file: None,
        frontend_flags: Some((mode, Where::Unix(socket.to_owned()))),
        admin,
        kubelet_tls: KubeletTls {
            roots: None,
            client: None,
        },
        timeout,
    }
}

#[tokio::test]
async fn a_frontend_that_accepts_and_never_answers_is_hop_2_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("frozen.sock");
    // Connections complete in the backlog; nobody ever reads them (a
    // stopped server).
    let _listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let limit = Duration::from_secs(1);
    let started = Instant::now();
    let r = run(
        plan(Mode::Grpc, &socket, "127.0.0.1:1".into(), limit),
        started,
    )
    .await;
    let failed = r.failed().expect("a broken hop");
    assert_eq!(failed.hop, Hop::Frontend, "{}", r.text());
    assert!(
        started.elapsed() < limit + Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(r.took <= limit + Duration::from_millis(100), "{:?}", r.took);
}

#[tokio::test]
async fn an_admin_endpoint_and_a_dial_that_hang_end_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("connect.sock");
    // A CONNECT frontend that accepts and never answers the CONNECT, and
    // an admin endpoint that accepts and never answers.
    let _frontend = tokio::net::UnixListener::bind(&socket).unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap().to_string();
    let limit = Duration::from_secs(2);
    let started = Instant::now();
    let r = run(plan(Mode::HttpConnect, &socket, admin_addr, limit), started).await;
    let failed = r.failed().expect("a broken hop");
    assert!(failed.hop <= Hop::Dial, "{}", r.text());
    assert!(
        started.elapsed() < limit + Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let server = r.checks.iter().find(|c| c.hop == Hop::Server);
    assert!(
        server.is_some_and(|c| c.summary.contains("not reachable") || c.status == Status::Failed),
        "{}",
        r.text()
    );
}
