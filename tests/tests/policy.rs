//! Who may go where: `--allowed-destinations` on the agent (checked on the
//! resolved address) and on the server per agent (checked before any
//! `DIAL_REQ`). A refused dial says why and whose list refused it, is
//! counted, never reaches the destination, and other dials keep working.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tests::client::{self, DialReason, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};

/// A listener that only counts the connections it accepts.
async fn counting() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (addr, n)
}

async fn get_through_grpc(server: &Server, target: &str) -> String {
    let ch = client::grpc_uds(&server.uds()).await;
    let mut conn = GrpcConn::dial(&ch, target).await.expect("allowed dial");
    conn.send(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..])
        .await
        .expect("send");
    String::from_utf8(conn.read_to_end().await).unwrap()
}

#[tokio::test]
async fn the_agent_dials_only_allowed_destinations() {
    init_logs();
    let pki = Pki::new();
    let allowed = dest::http("allowed").await;
    let (other, reached) = counting().await;
    let policy = format!("--allowed-destinations=127.0.0.1:{}", allowed.port());
    for mode in ["grpc", "http-connect"] {
        let server = Server::start(&pki, mode, Listen::Uds, &[]).await;
        let agent = Agent::start(&pki, server.agent_addr, "agent-1", &[&policy]).await;
        server.wait_agents(1).await;

        // Refused, and the destination never sees a connection.
        let text = if mode == "grpc" {
            let ch = client::grpc_uds(&server.uds()).await;
            let err = GrpcConn::dial(&ch, &other.to_string())
                .await
                .err()
                .expect("a forbidden dial must fail");
            assert!(
                matches!(
                    err,
                    client::Error::Dial {
                        reason: DialReason::Forbidden,
                        typed: true,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(err.hop(), client::Hop::Agent);
            err.message().unwrap().to_string()
        } else {
            let (status, text, reason) =
                client::refused(client::connect_uds(&server.uds(), &other.to_string()).await);
            assert_eq!((status, reason), (403, DialReason::Forbidden), "{text}");
            text
        };
        assert!(
            text.contains("not allowed by --allowed-destinations on the agent")
                && text.contains(&other.to_string())
                && text.contains(&format!("127.0.0.1:{}", allowed.port())),
            "{mode}: {text}"
        );
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "{mode}: the forbidden destination was reached"
        );
        assert_eq!(
            agent
                .metrics
                .endpoint_dial_failures
                .with_label_values(&["forbidden"])
                .get(),
            1,
            "{mode}"
        );

        // Allowed, by address and by a name that resolves to it.
        if mode == "grpc" {
            for target in [allowed.to_string(), format!("localhost:{}", allowed.port())] {
                let body = get_through_grpc(&server, &target).await;
                assert!(body.ends_with("allowed"), "{target}: {body}");
            }
        } else {
            let mut s = client::connect_uds(&server.uds(), &allowed.to_string())
                .await
                .expect("allowed CONNECT");
            assert!(client::http_get(&mut s).await.ends_with("allowed"));
        }
        agent.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn the_server_refuses_per_agent_before_dialing() {
    init_logs();
    let pki = Pki::new();
    let allowed = dest::http("allowed").await;
    let (other, reached) = counting().await;
    let per_agent = format!(
        "--agent-allowed-destinations=agent-1=127.0.0.1:{}",
        allowed.port()
    );
    // The default list would refuse everything but port 1; agent-1's own list
    // replaces it.
    let server = Server::start(
        &pki,
        "http-connect",
        Listen::Uds,
        &["--allowed-destinations=127.0.0.1:1", &per_agent],
    )
    .await;
    let _agent = Agent::start(&pki, server.agent_addr, "agent-1", &[]).await;
    server.wait_agents(1).await;

    let (status, text, reason) =
        client::refused(client::connect_uds(&server.uds(), &other.to_string()).await);
    assert_eq!((status, reason), (403, DialReason::Forbidden), "{text}");
    assert!(
        text.contains("not allowed by --allowed-destinations on the server for agent agent-1"),
        "{text}"
    );
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    assert_eq!(
        server
            .metrics
            .dial_failures
            .with_label_values(&["forbidden"])
            .get(),
        1
    );
    // A name cannot be judged on the server without resolving it: refused
    // unless a `*` entry allows its port.
    let (status, _, _) = client::refused(
        client::connect_uds(&server.uds(), &format!("localhost:{}", allowed.port())).await,
    );
    assert_eq!(status, 403);

    let mut s = client::connect_uds(&server.uds(), &allowed.to_string())
        .await
        .expect("allowed CONNECT");
    assert!(client::http_get(&mut s).await.ends_with("allowed"));
    server.stop().await;
}

#[test]
fn bad_lists_are_refused_at_startup_with_the_flag_named() {
    let pki = Pki::new();
    let server = |extra: &str| {
        let args = Server::args(
            &pki,
            "grpc",
            Listen::Uds,
            &pki.path("p.sock"),
            &[extra.to_string()],
        );
        let args = <proxy_server::config::Args as clap::Parser>::try_parse_from(args).unwrap();
        proxy_server::Config::from_args(args)
            .map(|_| ())
            .unwrap_err()
    };
    for (flag, want) in [
        (
            "--allowed-destinations=10.0.0.0/40",
            "--allowed-destinations",
        ),
        ("--agent-allowed-destinations=node-1", "AGENT_ID=LIST"),
        (
            "--agent-allowed-destinations=node-1=10.0.0.0/8:x",
            "agent node-1",
        ),
    ] {
        let e = format!("{:#}", server(flag));
        assert!(e.contains(want), "{flag}: {e}");
    }
    let args = Agent::args(
        &pki,
        "127.0.0.1:1".parse().unwrap(),
        "a",
        &["--allowed-destinations=nodes:10250"],
    );
    let args = <proxy_agent::config::Args as clap::Parser>::try_parse_from(args).unwrap();
    let e = format!(
        "{:#}",
        proxy_agent::config::Config::from_args(args)
            .map(|_| ())
            .unwrap_err()
    );
    assert!(
        e.contains("--allowed-destinations") && e.contains("nodes:10250"),
        "{e}"
    );
}
